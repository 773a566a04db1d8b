"""The synthetic phantom's anatomy (for ``lymphdx.data.synthetic``).

Tissue labels (``Tissue``) and their per-patient HU (``tissue_lut``), the phantom's voxel
grid and ellipsoids, and the anatomy (body wall, spine, vessels, organs, bowel, node fat:
``anatomy``). The lymph nodes are in ``lymphdx.data.synthetic_nodes``. Arrays are
``(z, y, x)``; points and spacing ``(x, y, z)`` in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lymphdx.data.synthetic_hospitals import Hospital

__all__ = [
    "PhantomGrid",
    "Sigma",
    "Tissue",
    "anatomy",
    "smooth_noise",
    "tissue_lut",
]

Sigma = float | tuple[float, float, float]  # a Gaussian sigma in voxels: one, or (z, y, x)


class Tissue:
    """Tissue labels of ``Scan.tissue`` (the anatomy before nodes are added)."""

    AIR = 0
    SUBQ_FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3  # cavity fat, perirenal fat: no nodes here
    RETRO_FAT = 4  # retroperitoneal fat around aorta/IVC: nodes
    MES_FAT = 5  # mesenteric-root fat around SMA/SMV: nodes
    BOWEL_WALL = 6
    BOWEL_FLUID = 7
    BOWEL_AIR = 8
    LIVER = 9
    SPLEEN = 10
    KIDNEY = 11
    ARTERY = 12  # aorta, SMA
    VEIN = 13  # IVC, SMV
    BONE_CORTEX = 14
    BONE_CANCELLOUS = 15
    DISC = 16
    CANAL = 17
    N = 18

    NODE_FAT = (RETRO_FAT, MES_FAT)  # where nodes may sit
    CAVITY = (VISCERAL_FAT, BOWEL_WALL, BOWEL_FLUID, BOWEL_AIR)  # organs may displace these


# --------------------------------------------------------------------------- geometry


@dataclass
class PhantomGrid:
    """The phantom's voxel grid: array ``shape`` ``(z, y, x)``; ``spacing``, ``origin`` and
    the voxel centres ``xs``, ``ys``, ``zs`` in world mm ``(x, y, z)``. ``base_spacing``:
    the hospital's reference grid's spacing, in whose voxels the hospital's sigmas are
    given (``Hospital``); equal to ``spacing`` on the reference grid itself."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: np.ndarray  # (x, y, z)
    origin: np.ndarray  # (x, y, z)
    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    base_spacing: np.ndarray  # (x, y, z)

    @classmethod
    def make(
        cls, size_xyz: tuple[int, int, int], spacing, centre, base_spacing=None
    ) -> PhantomGrid:
        size = np.asarray(size_xyz)
        spacing = np.asarray(spacing, dtype=float)
        base = spacing if base_spacing is None else np.asarray(base_spacing, dtype=float)
        origin = np.asarray(centre, dtype=float) - spacing * (size - 1) / 2.0
        xs, ys, zs = (
            (origin[i] + spacing[i] * np.arange(size[i])).astype(np.float32) for i in range(3)
        )
        return cls((int(size[2]), int(size[1]), int(size[0])), spacing, origin, xs, ys, zs, base)

    def base_voxels(self, sigma: float) -> Sigma:
        """A sigma given in voxels of the reference grid, in voxels of this grid ``(z, y,
        x)``: the same length in mm. On the reference grid itself: ``sigma`` unchanged."""
        if np.array_equal(self.base_spacing, self.spacing):
            return sigma
        return tuple(
            float(sigma * b / s)
            for b, s in zip(self.base_spacing[::-1], self.spacing[::-1], strict=True)
        )

    def mm_voxels(self, sigma_mm: float) -> Sigma:
        """A sigma in mm, in voxels of this grid ``(z, y, x)``."""
        return tuple(float(sigma_mm / s) for s in self.spacing[::-1])

    def box(self, center, half) -> tuple[slice, slice, slice] | None:
        """Index slices ``(z, y, x)`` of the voxels within ``half`` mm of ``center``."""
        half = np.broadcast_to(np.asarray(half, dtype=float), (3,))
        lo = np.floor((np.asarray(center) - half - self.origin) / self.spacing).astype(int)
        hi = np.ceil((np.asarray(center) + half - self.origin) / self.spacing).astype(int) + 1
        n = (self.shape[2], self.shape[1], self.shape[0])
        lo = np.clip(lo, 0, n)
        hi = np.clip(hi, 0, n)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def index_of(self, point) -> tuple[int, int, int]:
        """Nearest voxel ``(z, y, x)`` of a world point ``(x, y, z)`` (clipped to the grid)."""
        ijk = np.rint((np.asarray(point) - self.origin) / self.spacing).astype(int)
        ijk = np.clip(ijk, 0, np.asarray(self.shape[::-1]) - 1)
        return (int(ijk[2]), int(ijk[1]), int(ijk[0]))

    @property
    def h(self) -> float:
        """Geometric mean voxel size (mm): the partial-volume blending width."""
        return float(np.prod(self.spacing) ** (1 / 3))


@dataclass
class _Ellipsoid:
    sl: tuple[slice, slice, slice]
    u: tuple[np.ndarray, np.ndarray, np.ndarray]  # coordinates in the ellipsoid frame (mm)
    r: np.ndarray  # normalised radius (1 on the surface)
    d: np.ndarray  # approximate signed distance to the surface (mm), < 0 inside


def _ellipsoid(
    grid: PhantomGrid, center, axes, rot: np.ndarray | None = None, pad: float = 0.0
) -> _Ellipsoid | None:
    """Normalised radius and signed distance of an ellipsoid on its bounding box.

    ``axes`` are the semi-axes (mm); column ``i`` of ``rot`` is the world direction of
    axis ``i`` (identity when None).
    """
    axes = np.asarray(axes, dtype=np.float32)
    half = float(axes.max()) + pad if rot is not None else axes + pad
    sl = grid.box(center, half)
    if sl is None:
        return None
    dx = grid.xs[sl[2]][None, None, :] - np.float32(center[0])
    dy = grid.ys[sl[1]][None, :, None] - np.float32(center[1])
    dz = grid.zs[sl[0]][:, None, None] - np.float32(center[2])
    if rot is None:
        u = (dx, dy, dz)
    else:
        rt = rot.astype(np.float32)
        u = tuple(rt[0, i] * dx + rt[1, i] * dy + rt[2, i] * dz for i in range(3))
    shape = tuple(s.stop - s.start for s in sl)
    q = np.zeros(shape, np.float32)
    g = np.zeros(shape, np.float32)
    for i in range(3):
        q += (u[i] / axes[i]) ** 2
        g += (u[i] / axes[i] ** 2) ** 2
    r = np.sqrt(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(g > 0, (r - 1.0) * r / np.sqrt(g), -axes.min()).astype(np.float32)
    return _Ellipsoid(sl, u, r, d)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3×3 rotation (columns are orthonormal axes)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 2] = -q[:, 2]
    return q


def _paint(labels: np.ndarray, e: _Ellipsoid | None, value: int, allowed=None) -> None:
    """Set ``labels`` to ``value`` inside ellipsoid ``e`` (only over ``allowed`` labels)."""
    if e is None:
        return
    sub = labels[e.sl]
    m = e.r <= 1.0
    if allowed is not None:
        m &= np.isin(sub, allowed)
    sub[m] = value


def smooth_noise(rng: np.random.Generator, shape, sigma: Sigma) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation, float32; ``sigma``
    in voxels, one or per axis ``(z, y, x)``."""
    f = rng.standard_normal(shape, dtype=np.float32)
    if np.any(np.asarray(sigma) > 0):
        f = ndimage.gaussian_filter(f, sigma, mode="reflect", truncate=3.0)
    sd = float(f.std())
    return f / sd if sd > 0 else f


# --------------------------------------------------------------------------- anatomy


@dataclass
class _Vessel:
    x0: float
    y0: float
    radius: float
    drift: float  # x drift amplitude (mm) along z
    phase: float
    label: int

    def center(self, z):
        return self.x0 + self.drift * np.sin(z / 90.0 + self.phase), self.y0


def anatomy(
    rng: np.random.Generator,
    grid: PhantomGrid,
    ref: PhantomGrid | None = None,
    bowel: list[bool] | None = None,
) -> tuple[np.ndarray, list[_Vessel]]:
    """Tissue label volume ``(z, y, x)`` uint8 and the vessels nodes gather around.

    Decided on the reference grid, drawn on another: without ``ref`` the bowel loops are
    accepted or rejected by what ``grid`` holds, and the outcomes are appended to
    ``bowel`` (when given); with ``ref`` (the reference grid of the same patient and field
    of view) the outcomes are read from ``bowel`` instead, so that the same generator state
    paints the same anatomy in mm on ``grid`` and leaves the generator in the same state.
    """
    t = Tissue
    ref = grid if ref is None else ref
    replay = iter(bowel) if ref is not grid and bowel is not None else None
    nz, ny, nx = grid.shape
    labels = np.zeros(grid.shape, np.uint8)
    X = grid.xs[None, :]
    Y = grid.ys[:, None]

    # Body wall: skin/subcutaneous fat, muscle, cavity (cylinders along z).
    ax, ay = rng.uniform(122, 145), rng.uniform(92, 108)
    fat_t, mus_t = rng.uniform(8, 24), rng.uniform(7, 12)
    body = (X / ax) ** 2 + (Y / ay) ** 2 <= 1
    wall = (X / (ax - fat_t)) ** 2 + (Y / (ay - fat_t)) ** 2 <= 1
    cav = (X / (ax - fat_t - mus_t)) ** 2 + (Y / (ay - fat_t - mus_t)) ** 2 <= 1
    plane = np.where(cav, t.VISCERAL_FAT, np.where(wall, t.MUSCLE, np.where(body, t.SUBQ_FAT, 0)))
    labels[:] = plane.astype(np.uint8)[None]

    # Spine landmarks (posterior, y > 0).
    vb_rx, vb_ry = rng.uniform(19, 24), rng.uniform(15, 19)
    vb_y = ay - fat_t - mus_t - rng.uniform(38, 48)
    canal_y = vb_y + vb_ry + 9.0
    zc = ref.zs.mean()  # the reference grid's: the same mm at every resolution
    big = 1e4
    for sx in (-1, 1):  # paraspinal muscles behind the spine
        e = _ellipsoid(grid, (sx * 32.0, canal_y + 10.0, zc), (22.0, 17.0, big))
        _paint(labels, e, t.MUSCLE, (t.VISCERAL_FAT, t.SUBQ_FAT))

    # Retroperitoneal fat around the great vessels, mesenteric-root fat around SMA/SMV.
    ao_y = vb_y - vb_ry - rng.uniform(11, 15)
    ao = _Vessel(
        rng.uniform(8, 16),
        ao_y,
        rng.uniform(9, 12.5),
        rng.uniform(0, 4),
        rng.uniform(0, 6.3),
        t.ARTERY,
    )
    ivc = _Vessel(
        -rng.uniform(20, 27),
        vb_y - vb_ry - rng.uniform(8, 12),
        rng.uniform(9, 12),
        rng.uniform(0, 3),
        rng.uniform(0, 6.3),
        t.VEIN,
    )
    sma = _Vessel(rng.uniform(2, 9), ao_y - rng.uniform(30, 38), 4.0, 2.0, ao.phase, t.ARTERY)
    smv = _Vessel(-rng.uniform(6, 12), ao_y - rng.uniform(32, 40), 5.5, 2.0, ao.phase, t.VEIN)
    allowed_fat = (t.VISCERAL_FAT,)
    retro = _ellipsoid(grid, (0.0, vb_y - vb_ry - 12.0, zc), (rng.uniform(66, 76), 30.0, big))
    _paint(labels, retro, t.RETRO_FAT, allowed_fat)
    mes = _ellipsoid(grid, (-2.0, sma.y0 - 4.0, zc), (rng.uniform(36, 44), 22.0, big))
    _paint(labels, mes, t.MES_FAT, allowed_fat)

    # Bowel loops (small bowel) fill the cavity fat outside the node fat zones; the colon
    # runs along each flank.
    def loop(c, axes, rot, min_free: float = 0.6) -> bool:
        decided = None if replay is None else next(replay)
        drawn = _bowel(rng, grid, labels, c, axes, rot, min_free, decided)
        if replay is None and bowel is not None:
            bowel.append(drawn)
        return drawn

    n_loops, accepted = int(rng.integers(45, 66)), 0
    for _ in range(4 * n_loops):
        if accepted == n_loops:
            break
        c = (
            rng.uniform(-(ax - 40), ax - 40),
            rng.uniform(-(ay - 25), vb_y),
            rng.uniform(ref.zs[0], ref.zs[-1]),
        )
        axes = np.array([rng.uniform(18, 38), rng.uniform(9, 16), rng.uniform(9, 16)])
        accepted += loop(c, axes, _random_rotation(rng))
    for sx in (-1, 1):  # ascending / descending colon
        c = (sx * (ax - fat_t - mus_t - 22), rng.uniform(-15, 5), zc)
        loop(c, np.array([18.0, 16.0, big]), None, min_free=0.0)

    # Solid organs (displace cavity fat and bowel).
    liv = _ellipsoid(
        grid,
        (-0.42 * ax + rng.uniform(-8, 8), -0.1 * ay, zc + rng.uniform(60, 85)),
        (0.55 * ax, 0.8 * ay, rng.uniform(60, 80)),
    )
    _paint(labels, liv, t.LIVER, t.CAVITY)
    spl = _ellipsoid(
        grid,
        (0.55 * ax, 0.35 * ay, zc + rng.uniform(55, 80)),
        (rng.uniform(22, 30), rng.uniform(28, 36), rng.uniform(35, 50)),
    )
    _paint(labels, spl, t.SPLEEN, t.CAVITY)

    # Kidneys in perirenal fat; psoas muscles beside the vertebral bodies.
    kz = zc + rng.uniform(0, 25)
    for sx in (-1, 1):
        c = (sx * (vb_rx + rng.uniform(44, 52)), vb_y + rng.uniform(-2, 8), kz + rng.uniform(-8, 8))
        k_axes = (rng.uniform(22, 27), rng.uniform(17, 22), rng.uniform(42, 55))
        rot = _rot_z(sx * rng.uniform(0.3, 0.6))
        peri = _ellipsoid(grid, c, np.add(k_axes, 7), rot)
        _paint(labels, peri, t.VISCERAL_FAT, (*t.NODE_FAT, *t.CAVITY))
        _paint(labels, _ellipsoid(grid, c, k_axes, rot), t.KIDNEY)
        ps = (sx * (vb_rx + 13.0), vb_y + 2.0, zc)
        _paint(labels, _ellipsoid(grid, ps, (12.0, 15.0, big)), t.MUSCLE)

    # Vessels (cylinders along z that drift a little in x).
    vessels = [ao, ivc, sma, smv]
    for v in vessels:
        _tube(grid, labels, v)

    # Lumbar spine: vertebral bodies (cortex + cancellous) with discs, canal, neural arch.
    period, disc = rng.uniform(32, 38), rng.uniform(5, 8)
    phase = rng.uniform(0, period)
    is_disc = ((grid.zs - phase) % period) < disc  # (z,)
    vb = _ellipsoid(grid, (0.0, vb_y, zc), (vb_rx, vb_ry, big))
    sub = labels[vb.sl]
    inside = vb.r <= 1
    cortex = inside & (vb.d > -3.0)
    zdisc = is_disc[vb.sl[0]][:, None, None]
    sub[inside] = t.BONE_CANCELLOUS
    sub[cortex] = t.BONE_CORTEX
    sub[inside & zdisc] = t.DISC
    arch = _ellipsoid(grid, (0.0, canal_y, zc), (14.0, 13.0, big))
    _paint(labels, arch, t.BONE_CORTEX)
    spin = _ellipsoid(grid, (0.0, canal_y + 22.0, zc), (5.0, 13.0, big))
    _paint(labels, spin, t.BONE_CORTEX, (t.MUSCLE, t.SUBQ_FAT, t.VISCERAL_FAT))
    _paint(labels, _ellipsoid(grid, (0.0, canal_y, zc), (8.0, 7.5, big)), t.CANAL)
    return labels, vessels


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _bowel(
    rng, grid, labels, center, axes, rot, min_free: float = 0.6, decided: bool | None = None
) -> bool:
    """A bowel loop: soft-tissue wall, fluid lumen, and sometimes an air pocket anteriorly.

    Drawn only over cavity fat and other loops' walls; with ``min_free > 0`` only when it
    does not touch the node fat zones and at least ``min_free`` of it is still free fat
    (with 0 it is clipped instead). ``decided`` (True/False) skips these checks: the
    outcome on the reference grid (``anatomy``). Returns whether it was drawn.
    """
    t = Tissue
    if decided is False:
        return False
    if decided is None and min_free > 0 and labels[grid.index_of(center)] != t.VISCERAL_FAT:
        return False  # cheap early rejection
    e = _ellipsoid(grid, center, axes, rot)
    if e is None and decided is None:
        return False
    if e is not None:
        sub = labels[e.sl]
        inside = e.r <= 1
        lab = sub[inside]
        if decided is None and lab.size == 0:
            return False
        if (
            decided is None
            and min_free > 0
            and (
                np.isin(lab, t.NODE_FAT).any()
                or np.count_nonzero(lab == t.VISCERAL_FAT) < min_free * lab.size
            )
        ):
            return False
    # drawn: the generator's draws below happen whether or not this grid shows the loop
    wall_t = rng.uniform(2.5, 4.0)
    air = rng.random() < 0.45  # air rises anteriorly (supine patient: towards -y)
    level = center[1] + rng.uniform(-0.6, 0.4) * float(np.min(axes[:2])) if air else 0.0
    if e is None:
        return True
    free = np.isin(sub, (t.VISCERAL_FAT, t.BOWEL_WALL))
    outer = inside & free
    lumen = outer & (e.d < -wall_t)
    sub[outer] = t.BOWEL_WALL
    sub[lumen] = t.BOWEL_FLUID
    if air:
        ys = grid.ys[e.sl[1]][None, :, None]
        sub[lumen & (ys < level)] = t.BOWEL_AIR
    return True


def _tube(grid: PhantomGrid, labels: np.ndarray, v: _Vessel) -> None:
    """Paint a vessel running along z whose centre drifts in x."""
    half = v.radius + abs(v.drift) + 2 * float(grid.spacing.max())
    sl = grid.box((v.x0, v.y0, float(grid.zs.mean())), (half, half, 1e4))
    if sl is None:
        return
    cx, cy = v.center(grid.zs[sl[0]])
    dx = grid.xs[sl[2]][None, None, :] - np.asarray(cx, np.float32)[:, None, None]
    dy = grid.ys[sl[1]][None, :, None] - np.float32(cy)
    labels[sl][dx**2 + dy**2 <= v.radius**2] = v.label


# --------------------------------------------------------------------------- tissue intensities


def tissue_lut(rng: np.random.Generator, hp: Hospital) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient HU and texture amplitude of each ``Tissue`` label (before calibration)."""
    t = Tissue
    hu = np.zeros(t.N, np.float32)
    amp = np.zeros(t.N, np.float32)

    def g(ms):
        return rng.normal(ms[0], ms[1])

    fat = rng.normal(-98, 6)
    vals = {
        t.AIR: (-1000.0, 0.0),
        t.SUBQ_FAT: (fat, 6.0),
        t.MUSCLE: (rng.normal(52, 4), 6.0),
        t.VISCERAL_FAT: (fat + rng.normal(4, 2), 6.0),
        t.RETRO_FAT: (fat + rng.normal(4, 2), 6.0),
        t.MES_FAT: (fat + rng.normal(6, 2), 7.0),
        t.BOWEL_WALL: (g(hp.bowel_wall_hu), 8.0),
        t.BOWEL_FLUID: (rng.normal(15, 6), 10.0),
        t.BOWEL_AIR: (-1000.0 + rng.normal(20, 10), 15.0),
        t.LIVER: (g(hp.liver_hu), 8.0),
        t.SPLEEN: (g(hp.spleen_hu), 8.0),
        t.KIDNEY: (g(hp.kidney_hu), 12.0),
        t.ARTERY: (g(hp.aorta_hu), 4.0),
        t.VEIN: (g(hp.vein_hu), 5.0),
        t.BONE_CORTEX: (rng.normal(700, 40), 40.0),
        t.BONE_CANCELLOUS: (rng.normal(400, 40), 40.0),
        t.DISC: (rng.normal(80, 8), 8.0),
        t.CANAL: (rng.normal(15, 4), 4.0),
    }
    for k, (m, a) in vals.items():
        hu[k], amp[k] = m, a * hp.texture_gain
    return hu, amp
