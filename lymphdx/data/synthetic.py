"""Synthetic two-hospital abdominal-CT phantom with lymph nodes (the ``lymphdx synth`` data).

A procedural, seeded and deterministic phantom in Hounsfield units. Each scan holds an
elliptical body (subcutaneous fat, muscle wall, paraspinal and psoas muscles), a lumbar
spine (vertebral bodies with cortex, discs, canal, neural arch), aorta and IVC with
mesenteric vessels, liver, spleen, two kidneys in perirenal fat, bowel loops and colon
(some with air), retroperitoneal and mesenteric-root fat, and 3-9 lymph nodes that sit in
that fat near the vessels, never inside an organ.

* Benign nodes: smaller (equivalent diameter ≈ 10-22 mm), oval (short/long axis
  0.45-0.75), homogeneous (30-50 HU), some with a fatty hilum.
* Metastatic nodes: rounder (0.7-1.0), larger on average (≈ 14-34 mm, overlapping the
  benign sizes), half heterogeneous, some with a necrotic (≈ 10 HU) centre.

The phantom is *scaled*: nodes are larger than real ones so that they stay resolvable on
the ``quick`` preset's 5×5×6 mm grid, and they lie within ±100 mm (x, y) and ±75 mm (z) of
the volume centre, inside the quick preset's 240×240×192 mm centre crop.

Two "hospitals" differ as real ones do: intensity calibration (B: gain 1.05, +15 HU),
contrast phase (A portal-venous, B arterial), noise level and texture, voxel spacing and
field of view (``HOSPITALS``). Hospital A gives the weak set (scan labels only), B the
strong set (instance masks of all nodes).

Harder variants (``SynthSpec.shift``, ``SynthSpec.node_scale``; ``lymphdx synth --shift
--node-scale``): ``shift`` moves B's acquisition along the line from A's (0: B scanned like A,
1: the default B, 2: twice the default difference; ``shifted_hospital``), ``node_scale``
multiplies every node's diameter range in both hospitals (0.6: nodes 0.6x as large relative
to the voxel). The defaults (1, 1) give exactly the arrays described here.

Why a whole-volume intensity histogram cannot solve the weak task (see
``benchmarks/shortcut_vs_oracle.py``): everything except the nodes is drawn independently
of the label (body size, organ sizes and positions, bowel gas, contrast timing vary per
patient), the number of nodes has the same distribution in both classes (positives get
metastatic nodes *instead of* some benign ones), node intensities overlap between classes,
and all nodes together are < 0.5 % of the voxels. The label is only visible locally, in
the size, shape and texture of a few nodes.

Determinism: every patient has its own generator derived from ``(seed, set name, index)``
(``patient_rng``), so patient *i* does not depend on how many patients precede it, and the
same seed gives byte-identical arrays.

Axis convention: arrays are ``(z, y, x)``; spacing, origin and node centres are
``(x, y, z)`` in mm in the LPS world frame (x to the patient's left, y posterior,
z superior).
"""

from __future__ import annotations

import csv
import io
import math
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from lymphdx.core.files import ensure_writable_dir, write_json, write_text
from lymphdx.io.volumes import Geometry, write_volume

__all__ = [
    "HOSPITALS",
    "Hospital",
    "NODE_COLUMNS",
    "Node",
    "Scan",
    "SynthSpec",
    "Tissue",
    "make_scan",
    "patient_rng",
    "shifted_hospital",
    "default_n_pos",
    "weak_labels",
    "write_synthetic",
]


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


@dataclass(frozen=True)
class Hospital:
    """Acquisition and population parameters of one synthetic hospital.

    ``spacing`` and ``size`` are ``(x, y, z)``; HU values are ``(mean, sd between
    patients)`` before calibration (``gain * hu + offset``). Noise and texture sigmas are
    in voxels.
    """

    name: str
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    gain: float
    offset: float
    noise_sd: float
    noise_sigma: float
    texture_gain: float
    texture_sigma: float
    psf_sigma: float
    aorta_hu: tuple[float, float]
    vein_hu: tuple[float, float]
    liver_hu: tuple[float, float]
    spleen_hu: tuple[float, float]
    kidney_hu: tuple[float, float]
    bowel_wall_hu: tuple[float, float]
    n_nodes: tuple[int, int]  # inclusive range of nodes per scan
    p_metastatic: float  # used when make_scan(metastatic=None)


HOSPITALS: dict[str, Hospital] = {
    # "Hospital A" (weak set, like the paper's RAH): portal-venous phase, smooth noise.
    "A": Hospital(
        name="A",
        spacing=(4.0, 4.0, 5.0),
        size=(80, 80, 48),
        gain=1.0,
        offset=0.0,
        noise_sd=12.0,
        noise_sigma=1.0,
        texture_gain=1.0,
        texture_sigma=2.5,
        psf_sigma=0.5,
        aorta_hu=(150.0, 15.0),
        vein_hu=(135.0, 12.0),
        liver_hu=(110.0, 10.0),
        spleen_hu=(120.0, 10.0),
        kidney_hu=(165.0, 15.0),
        bowel_wall_hu=(55.0, 6.0),
        n_nodes=(3, 9),
        p_metastatic=57 / 123,
    ),
    # "Hospital B" (strong set, like TCIA CT Lymph Nodes): arterial phase, finer noise.
    "B": Hospital(
        name="B",
        spacing=(3.5, 3.5, 4.0),
        size=(96, 96, 56),
        gain=1.05,
        offset=15.0,
        noise_sd=25.0,
        noise_sigma=0.5,
        texture_gain=1.3,
        texture_sigma=1.5,
        psf_sigma=0.45,
        aorta_hu=(250.0, 25.0),
        vein_hu=(85.0, 12.0),
        liver_hu=(70.0, 8.0),
        spleen_hu=(115.0, 15.0),
        kidney_hu=(190.0, 20.0),
        bowel_wall_hu=(45.0, 6.0),
        n_nodes=(5, 9),
        p_metastatic=0.4,
    ),
}
_ALIASES = {"A": "A", "WEAK": "A", "B": "B", "STRONG": "B"}

# Node populations (equivalent diameters in mm; roundness = short / long axis).
BENIGN_DIAMETER = (10.0, 22.0)
METASTATIC_DIAMETER = (14.0, 34.0)
BENIGN_ROUNDNESS = (0.40, 0.85)  # skewed towards oval: mean ≈ 0.58
METASTATIC_ROUNDNESS = (0.60, 1.0)  # skewed towards round: mean ≈ 0.85
NODE_XY_RANGE_MM = 100.0  # node centres within ± this of the volume centre (x, y)
NODE_Z_RANGE_MM = 75.0  # ... and within ± this (z): whole nodes stay in the 192 mm crop
HU_MIN, HU_MAX = -1024, 3071  # stored range (int16, as most scanners write)

# SynthSpec.shift: B' = A + shift * (B - A) for these acquisition parameters ...
SHIFT_FIELDS = (
    "gain",
    "offset",
    "noise_sd",
    "noise_sigma",
    "texture_gain",
    "texture_sigma",
    "psf_sigma",
)
# ... for the means of these contrast-phase HU (mean, sd) pairs (the sd stays B's) ...
SHIFT_HU_FIELDS = ("aorta_hu", "vein_hu", "liver_hu", "spleen_hu", "kidney_hu", "bowel_wall_hu")
# ... and for the voxel spacing (B's field of view in mm is kept), clamped to valid values:
SHIFT_FLOORS = {
    "gain": 0.05,
    "noise_sd": 1.0,  # HU
    "noise_sigma": 0.25,  # voxels (0.25 is already practically white noise)
    "texture_gain": 0.0,
    "texture_sigma": 0.25,
    "psf_sigma": 0.25,
}
SHIFT_HU_RANGE = (20.0, 1000.0)  # enhanced soft tissue / blood: above water, below bone
MIN_SPACING_MM = 0.5
MAX_NODE_SCALE = 2.0  # SynthSpec.node_scale in (0, MAX_NODE_SCALE]

NODE_COLUMNS = (
    "patient_id",
    "node_id",
    "x_mm",
    "y_mm",
    "z_mm",
    "diameter_mm",
    "metastatic",
    "necrotic",
    "heterogeneous",
    "fatty_hilum",
    "roundness",
    "mean_hu",
)


# the paper's weak set: 57 of 123 scans positive
PAPER_N_WEAK, PAPER_N_POS = 123, 57
SEED_LIMIT = 2**32  # numpy seeds are unsigned 32-bit words; one word keeps seeds simple


def default_n_pos(n_weak: int) -> int:
    """Positive scans among ``n_weak`` at the paper's prevalence (57/123), rounded."""
    return int(n_weak * PAPER_N_POS / PAPER_N_WEAK + 0.5)


@dataclass
class SynthSpec:
    """What ``write_synthetic`` generates: set sizes, the seed and how hard the data are.

    ``n_pos``: positive weak scans; ``None`` (default) follows the paper's prevalence,
    ``round(n_weak * 57 / 123)`` (57 of 123), and is resolved to that number here.
    ``seed``: in ``[0, 2**32)``. ``shift`` (>= 0): how far hospital B's acquisition lies
    from A's (``shifted_hospital``; 0: like A's, 1: the default B, 2: twice the default
    difference). ``node_scale`` (in ``(0, 2]``): multiplies every node's
    equivalent-diameter range in both hospitals.
    """

    n_weak: int = 123
    n_pos: int | None = None
    n_strong: int = 85
    seed: int = 0
    shift: float = 1.0
    node_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.n_weak < 0 or self.n_strong < 0:
            raise ValueError("n_weak and n_strong must be >= 0")
        if self.n_pos is None:
            self.n_pos = default_n_pos(self.n_weak)
        if not 0 <= self.n_pos <= self.n_weak:
            raise ValueError(f"n_pos must be in [0, n_weak={self.n_weak}], got {self.n_pos}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if not (math.isfinite(self.shift) and self.shift >= 0):
            raise ValueError(f"shift must be a finite number >= 0, got {self.shift}")
        if not 0 < self.node_scale <= MAX_NODE_SCALE:
            raise ValueError(
                f"node_scale must be in (0, {MAX_NODE_SCALE:g}], got {self.node_scale}"
            )

    def hospital(self, name: str) -> Hospital:
        """Hospital ``name`` as this spec generates it: A as is, B moved by ``shift``."""
        hp = _hospital(name)
        return shifted_hospital(self.shift) if hp.name == "B" else hp


@dataclass
class Node:
    """One lymph node; ``center_mm`` is world ``(x, y, z)`` (LPS mm).

    ``diameter_mm`` is the equivalent (equal-volume sphere) diameter of the ellipsoid,
    ``roundness`` its short/long axis ratio, ``axes_mm`` its full axis lengths (long,
    middle, short), ``mean_hu`` the mean stored HU over its mask voxels.
    """

    id: int
    center_mm: tuple[float, float, float]
    diameter_mm: float
    metastatic: bool
    necrotic: bool
    heterogeneous: bool
    fatty_hilum: bool
    roundness: float
    mean_hu: float = float("nan")
    axes_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Scan:
    """One synthetic scan.

    Attributes:
        hu: ``(z, y, x)`` float32 HU, already rounded and clipped to the stored int16 range.
        instances: ``(z, y, x)`` uint16 node instance ids (0 background, 1..k = ``nodes``).
        geometry: spacing/origin ``(x, y, z)`` mm, identity direction.
        nodes: the nodes, ``nodes[i].id == i + 1``.
        tissue: ``(z, y, x)`` uint8 ``Tissue`` labels of the anatomy without nodes.
        hospital: ``"A"`` or ``"B"``.
    """

    hu: np.ndarray
    instances: np.ndarray
    geometry: Geometry
    nodes: list[Node]
    tissue: np.ndarray | None = None
    hospital: str = "A"

    @property
    def metastatic(self) -> bool:
        """The scan label: True iff at least one node is metastatic."""
        return any(n.metastatic for n in self.nodes)


# --------------------------------------------------------------------------- geometry


@dataclass
class _Grid:
    shape: tuple[int, int, int]  # (z, y, x)
    spacing: np.ndarray  # (x, y, z)
    origin: np.ndarray  # (x, y, z)
    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    @classmethod
    def make(cls, size_xyz: tuple[int, int, int], spacing, centre) -> _Grid:
        size = np.asarray(size_xyz)
        spacing = np.asarray(spacing, dtype=float)
        origin = np.asarray(centre, dtype=float) - spacing * (size - 1) / 2.0
        xs, ys, zs = (
            (origin[i] + spacing[i] * np.arange(size[i])).astype(np.float32) for i in range(3)
        )
        return cls((int(size[2]), int(size[1]), int(size[0])), spacing, origin, xs, ys, zs)

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
    grid: _Grid, center, axes, rot: np.ndarray | None = None, pad: float = 0.0
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


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation, float32."""
    f = rng.standard_normal(shape, dtype=np.float32)
    if sigma > 0:
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


def _anatomy(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, list[_Vessel]]:
    """Tissue label volume ``(z, y, x)`` uint8 and the vessels nodes gather around."""
    t = Tissue
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
    zc = grid.zs.mean()
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
    n_loops, accepted = int(rng.integers(45, 66)), 0
    for _ in range(4 * n_loops):
        if accepted == n_loops:
            break
        c = (
            rng.uniform(-(ax - 40), ax - 40),
            rng.uniform(-(ay - 25), vb_y),
            rng.uniform(grid.zs[0], grid.zs[-1]),
        )
        axes = np.array([rng.uniform(18, 38), rng.uniform(9, 16), rng.uniform(9, 16)])
        accepted += _bowel(rng, grid, labels, c, axes, _random_rotation(rng))
    for sx in (-1, 1):  # ascending / descending colon
        c = (sx * (ax - fat_t - mus_t - 22), rng.uniform(-15, 5), zc)
        _bowel(rng, grid, labels, c, np.array([18.0, 16.0, big]), None, min_free=0.0)

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


def _bowel(rng, grid, labels, center, axes, rot, min_free: float = 0.6) -> bool:
    """A bowel loop: soft-tissue wall, fluid lumen, and sometimes an air pocket anteriorly.

    Drawn only over cavity fat and other loops' walls; with ``min_free > 0`` only when it
    does not touch the node fat zones and at least ``min_free`` of it is still free fat
    (with 0 it is clipped instead). Returns whether it was drawn.
    """
    t = Tissue
    if min_free > 0 and labels[grid.index_of(center)] != t.VISCERAL_FAT:
        return False  # cheap early rejection
    e = _ellipsoid(grid, center, axes, rot)
    if e is None:
        return False
    sub = labels[e.sl]
    inside = e.r <= 1
    lab = sub[inside]
    if lab.size == 0:
        return False
    if min_free > 0 and (
        np.isin(lab, t.NODE_FAT).any()
        or np.count_nonzero(lab == t.VISCERAL_FAT) < min_free * lab.size
    ):
        return False
    free = np.isin(sub, (t.VISCERAL_FAT, t.BOWEL_WALL))
    wall_t = rng.uniform(2.5, 4.0)
    outer = inside & free
    lumen = outer & (e.d < -wall_t)
    sub[outer] = t.BOWEL_WALL
    sub[lumen] = t.BOWEL_FLUID
    if rng.random() < 0.45:  # air rises anteriorly (supine patient: towards -y)
        level = center[1] + rng.uniform(-0.6, 0.4) * float(np.min(axes[:2]))
        ys = grid.ys[e.sl[1]][None, :, None]
        sub[lumen & (ys < level)] = t.BOWEL_AIR
    return True


def _tube(grid: _Grid, labels: np.ndarray, v: _Vessel) -> None:
    """Paint a vessel running along z whose centre drifts in x."""
    half = v.radius + abs(v.drift) + 2 * float(grid.spacing.max())
    sl = grid.box((v.x0, v.y0, float(grid.zs.mean())), (half, half, 1e4))
    if sl is None:
        return
    cx, cy = v.center(grid.zs[sl[0]])
    dx = grid.xs[sl[2]][None, None, :] - np.asarray(cx, np.float32)[:, None, None]
    dy = grid.ys[sl[1]][None, :, None] - np.float32(cy)
    labels[sl][dx**2 + dy**2 <= v.radius**2] = v.label


# --------------------------------------------------------------------------- nodes


@dataclass
class _NodeDraw:
    metastatic: bool
    diameter: float
    roundness: float
    semi: np.ndarray  # semi-axes (long, middle, short), mm
    rot: np.ndarray
    hu: float
    heterogeneous: bool
    necrotic: bool
    necrosis_scale: float
    necrosis_hu: float
    fatty_hilum: bool
    hilum_hu: float


def _semi_axes(diameter: float, roundness: float, middle: float) -> np.ndarray:
    """Semi-axes (long, middle, short) with the given equivalent diameter and ratios."""
    long = diameter / 2.0 / (middle * roundness) ** (1 / 3)
    return np.array([long, long * middle, long * roundness])


def _draw_node(rng: np.random.Generator, metastatic: bool, scale: float = 1.0) -> _NodeDraw:
    """Draw one node; ``scale`` multiplies the diameter range (and the size thresholds of
    necrosis and fatty hilum, so that these depend on the relative size as at scale 1)."""
    if metastatic:
        lo, hi = (scale * v for v in METASTATIC_DIAMETER)
        d = lo + (hi - lo) * rng.beta(1.6, 1.8)
        rho = METASTATIC_ROUNDNESS[0] + np.diff(METASTATIC_ROUNDNESS)[0] * rng.beta(2.5, 1.5)
        mid = rho + rng.uniform(0, 1) * (1 - rho)
        hetero = bool(rng.random() < 0.5)
        necrotic = bool(rng.random() < 0.15 + 0.5 * (d - lo) / (20.0 * scale))
        hilum = False
        hu = rng.uniform(30, 55)
    else:
        lo, hi = (scale * v for v in BENIGN_DIAMETER)
        d = lo + (hi - lo) * rng.beta(1.3, 2.2)
        rho = BENIGN_ROUNDNESS[0] + np.diff(BENIGN_ROUNDNESS)[0] * rng.beta(2.0, 3.0)
        mid = rho + rng.uniform(0, 0.5) * (1 - rho)
        hetero = necrotic = False
        hilum = bool(d >= 12 * scale and rng.random() < 0.35)
        hu = rng.uniform(30, 50)
    return _NodeDraw(
        metastatic=metastatic,
        diameter=float(d),
        roundness=float(rho),
        semi=_semi_axes(float(d), float(rho), float(mid)),
        rot=_random_rotation(rng),
        hu=float(hu),
        heterogeneous=hetero,
        necrotic=necrotic,
        necrosis_scale=float(rng.uniform(0.4, 0.65)),
        necrosis_hu=float(rng.uniform(5, 15)),
        fatty_hilum=hilum,
        hilum_hu=float(rng.uniform(-85, -55)),
    )


def _place_node(
    rng: np.random.Generator,
    grid: _Grid,
    labels: np.ndarray,
    instances: np.ndarray,
    vessels: list[_Vessel],
    nd: _NodeDraw,
    node_id: int,
    vc: np.ndarray,
    tries: int = 400,
) -> tuple[float, float, float] | None:
    """Find a spot in node fat near a vessel, rasterise the node into ``instances``.

    The node (plus a one-voxel gap to other nodes) must lie entirely in retroperitoneal
    or mesenteric fat. Returns the centre (world mm) or None when no spot was found.
    """
    weights = np.array([0.35, 0.3, 0.15, 0.2])
    gap = float(grid.spacing.min())
    for _ in range(tries):
        v = vessels[int(rng.choice(len(vessels), p=weights))]
        z = vc[2] + rng.uniform(-NODE_Z_RANGE_MM, NODE_Z_RANGE_MM)
        theta = rng.uniform(0, 2 * np.pi)
        dist = v.radius + nd.semi[0] * rng.uniform(0.6, 1.0) + rng.uniform(1.5, 14.0)
        cx, cy = v.center(z)
        c = np.array([cx + dist * np.cos(theta), cy + dist * np.sin(theta), z])
        if np.any(np.abs(c[:2] - vc[:2]) > NODE_XY_RANGE_MM):
            continue
        e = _ellipsoid(grid, c, nd.semi, nd.rot, pad=2 * gap)
        if e is None:
            continue
        inside = e.d <= 0
        ci = grid.index_of(c)
        local = tuple(ci[k] - e.sl[k].start for k in range(3))
        if not all(0 <= local[k] < inside.shape[k] for k in range(3)):
            continue
        inside[local] = True  # a node always covers the voxel nearest its centre
        lab = labels[e.sl]
        if not np.isin(lab[inside], Tissue.NODE_FAT).all():
            continue
        if np.any(instances[e.sl][(e.d <= gap) | inside] != 0):
            continue
        instances[e.sl][inside] = node_id
        return (float(c[0]), float(c[1]), float(c[2]))
    return None


def _render_node(
    rng: np.random.Generator,
    grid: _Grid,
    image: np.ndarray,
    center,
    nd: _NodeDraw,
    texture_gain: float,
) -> None:
    """Blend the node's HU into ``image`` with a one-voxel partial-volume edge."""
    h = grid.h
    e = _ellipsoid(grid, center, nd.semi, nd.rot, pad=1.5 * h)
    # Partial volume over ~0.6 voxel: a little sharper than a box voxel's, so that small
    # nodes keep some contrast after the PSF on 4-5 mm voxels.
    w = np.clip(0.5 - e.d / (0.6 * h), 0.0, 1.0)
    amp = (14.0 if nd.heterogeneous else 3.0) * texture_gain
    val = nd.hu + amp * _smooth_noise(rng, w.shape, 1.0 if nd.heterogeneous else 1.5)
    r_eq = nd.diameter / 2.0
    if nd.necrotic:
        wn = np.clip((1.0 - e.r / nd.necrosis_scale) * nd.necrosis_scale * r_eq / h + 0.5, 0, 1)
        val = val * (1 - wn) + nd.necrosis_hu * wn
    if nd.fatty_hilum:
        hs = nd.semi * np.array([0.4, 0.5, 0.55])
        off = 0.6 * nd.semi[2]
        rh = np.sqrt((e.u[0] / hs[0]) ** 2 + (e.u[1] / hs[1]) ** 2 + ((e.u[2] - off) / hs[2]) ** 2)
        wh = np.clip((1.0 - rh) * float(hs.min()) / h + 0.5, 0, 1)
        val = val * (1 - wh) + nd.hilum_hu * wh
    sub = image[e.sl]
    sub[...] = sub * (1 - w) + val * w


# --------------------------------------------------------------------------- scans


def _hospital(name: str) -> Hospital:
    key = _ALIASES.get(str(name).upper())
    if key is None:
        raise ValueError(f"unknown hospital {name!r}; expected one of A, B, weak, strong")
    return HOSPITALS[key]


def _lerp(a: float, b: float, t: float) -> float:
    """``a + t * (b - a)``, written so that t = 0 gives exactly ``a`` and t = 1 exactly ``b``."""
    return (1.0 - t) * a + t * b


def shifted_hospital(shift: float) -> Hospital:
    """Hospital B with its acquisition moved to ``A + shift * (B - A)``.

    Applies to ``SHIFT_FIELDS``, the means of ``SHIFT_HU_FIELDS`` (their between-patient sd
    stays B's) and the voxel spacing; values are clamped to ``SHIFT_FLOORS``,
    ``SHIFT_HU_RANGE`` and ``MIN_SPACING_MM``. ``size`` is chosen so that B's field of view
    in mm stays (to the nearest voxel) as it is. The population (``n_nodes``,
    ``p_metastatic``) stays B's. ``shift=1`` returns exactly ``HOSPITALS["B"]``.
    """
    a, b = HOSPITALS["A"], HOSPITALS["B"]
    changes: dict = {}
    for f in SHIFT_FIELDS:
        v = _lerp(getattr(a, f), getattr(b, f), shift)
        changes[f] = max(v, SHIFT_FLOORS[f]) if f in SHIFT_FLOORS else v
    for f in SHIFT_HU_FIELDS:
        (ma, _), (mb, sd) = getattr(a, f), getattr(b, f)
        changes[f] = (float(np.clip(_lerp(ma, mb, shift), *SHIFT_HU_RANGE)), sd)
    spacing = tuple(
        max(_lerp(sa, sb, shift), MIN_SPACING_MM)
        for sa, sb in zip(a.spacing, b.spacing, strict=True)
    )
    size = tuple(
        max(1, round(n * sb / s)) for n, sb, s in zip(b.size, b.spacing, spacing, strict=True)
    )
    return replace(b, spacing=spacing, size=size, **changes)


def _tissue_lut(rng: np.random.Generator, hp: Hospital) -> tuple[np.ndarray, np.ndarray]:
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


def make_scan(
    rng: np.random.Generator,
    hospital: str | Hospital,
    metastatic: bool | None,
    node_scale: float = 1.0,
) -> Scan:
    """Generate one scan of ``hospital`` (``"A"``/``"weak"``, ``"B"``/``"strong"`` or a
    ``Hospital``, e.g. ``SynthSpec.hospital("B")``).

    ``metastatic``: True gives 1-3 metastatic nodes among the scan's nodes, False none,
    None draws it with the hospital's ``p_metastatic``. Every scan has benign nodes.
    ``node_scale`` multiplies the nodes' diameter ranges (``SynthSpec.node_scale``).

    Returns:
        A ``Scan`` with ``hu`` ``(z, y, x)`` float32 (int16-valued), ``instances``
        ``(z, y, x)`` uint16 and ``tissue`` ``(z, y, x)`` uint8 on ``geometry``'s grid.
    """
    hp = hospital if isinstance(hospital, Hospital) else _hospital(hospital)
    if not node_scale > 0:
        raise ValueError(f"node_scale must be > 0, got {node_scale}")
    if metastatic is None:
        metastatic = bool(rng.random() < hp.p_metastatic)
    shift = rng.uniform(-8, 8, size=3)
    grid = _Grid.make(hp.size, hp.spacing, shift)
    vc = shift.astype(float)
    labels, vessels = _anatomy(rng, grid)

    # Node count does not depend on the label: positives get metastatic nodes instead of
    # some benign ones (see the module docstring on shortcuts).
    n_nodes = int(rng.integers(hp.n_nodes[0], hp.n_nodes[1] + 1))
    n_met = 0
    if metastatic:
        n_met = min(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), n_nodes - 1)
    kinds = [True] * n_met + [False] * (n_nodes - n_met)
    instances = np.zeros(grid.shape, np.uint16)
    placed: list[tuple[_NodeDraw, tuple[float, float, float]]] = []
    for is_met in kinds:
        nd = _draw_node(rng, is_met, node_scale)
        center = None
        for _ in range(6):  # shrink a node that does not fit anywhere (rare)
            center = _place_node(rng, grid, labels, instances, vessels, nd, len(placed) + 1, vc)
            if center is not None:
                break
            nd.diameter *= 0.9
            nd.semi = nd.semi * 0.9
        if center is None:
            raise RuntimeError("synthetic phantom: could not place a lymph node")
        placed.append((nd, center))
    order = rng.permutation(len(placed))  # metastatic nodes are not always id 1
    remap = np.zeros(len(placed) + 1, np.uint16)
    remap[1 + order] = np.arange(1, len(placed) + 1, dtype=np.uint16)
    instances = remap[instances]
    placed = [placed[i] for i in order]

    # Intensities: tissue HU + smooth per-tissue texture, nodes, PSF, noise, calibration.
    lut, amp = _tissue_lut(rng, hp)
    tex = _smooth_noise(rng, grid.shape, hp.texture_sigma)
    image = lut[labels] + tex * amp[labels]
    for nd, center in placed:
        _render_node(rng, grid, image, center, nd, hp.texture_gain)
    image = ndimage.gaussian_filter(image, hp.psf_sigma, truncate=3.0)
    image += hp.noise_sd * _smooth_noise(rng, grid.shape, hp.noise_sigma)
    image = hp.gain * image + hp.offset
    hu = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.float32)

    nodes = []
    for i, (nd, center) in enumerate(placed, start=1):
        vox = hu[instances == i]
        nodes.append(
            Node(
                id=i,
                center_mm=center,
                diameter_mm=round(nd.diameter, 3),
                metastatic=nd.metastatic,
                necrotic=nd.necrotic,
                heterogeneous=nd.heterogeneous,
                fatty_hilum=nd.fatty_hilum,
                roundness=round(nd.roundness, 4),
                mean_hu=round(float(vox.mean()), 2),
                axes_mm=tuple(round(float(2 * a), 3) for a in nd.semi),
            )
        )
    geometry = Geometry(tuple(float(s) for s in grid.spacing), tuple(float(o) for o in grid.origin))
    return Scan(hu, instances, geometry, nodes, labels, hp.name)


# --------------------------------------------------------------------------- data set


def patient_rng(seed: int, set_name: str, index: int) -> np.random.Generator:
    """The generator of patient ``index`` (0-based) of set ``set_name`` ("weak"/"strong")."""
    return np.random.default_rng([int(seed), zlib.crc32(set_name.encode()), int(index)])


def weak_labels(spec: SynthSpec) -> np.ndarray:
    """Scan labels ``(n_weak,)`` int: ``n_pos`` ones in an order shuffled by the seed."""
    labels = np.zeros(spec.n_weak, dtype=int)
    rng = np.random.default_rng([int(spec.seed), zlib.crc32(b"weak-labels")])
    labels[rng.permutation(spec.n_weak)[: spec.n_pos]] = 1
    return labels


def _csv(rows: list[list], header) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _node_rows(pid: str, nodes: list[Node]) -> list[list]:
    return [
        [
            pid,
            n.id,
            f"{n.center_mm[0]:.2f}",
            f"{n.center_mm[1]:.2f}",
            f"{n.center_mm[2]:.2f}",
            f"{n.diameter_mm:.2f}",
            int(n.metastatic),
            int(n.necrotic),
            int(n.heterogeneous),
            int(n.fatty_hilum),
            f"{n.roundness:.3f}",
            f"{n.mean_hu:.1f}",
        ]
        for n in nodes
    ]


def _pid(prefix: str, i: int, n: int) -> str:
    return f"{prefix}{i + 1:0{max(4, len(str(n)))}d}"


def write_synthetic(out: str | Path, spec: SynthSpec | None = None, progress: bool = False) -> dict:
    """Generate both sets and write them under ``out`` (layout below); return a summary.

    Layout (paths in the CSVs are relative to the CSV's folder)::

        out/weak/manifest.csv        patient_id,image,label     images/W0001.nii.gz ...
        out/strong/manifest.csv      patient_id,image,mask      images/S0001.nii.gz, masks/...
        out/strong/nodes.csv         one row per node (NODE_COLUMNS)
        out/weak_truth/masks/W0001.nii.gz, out/weak_truth/nodes.csv  (never used to train)
        out/synth.json               spec (incl. shift, node_scale) + summary + hospitals

    Images are int16 HU, masks uint16 node instance ids.
    """
    spec = spec or SynthSpec()
    hospitals = {h: spec.hospital(h) for h in ("A", "B")}
    out = ensure_writable_dir(out)  # before minutes of work, not after
    t0 = time.perf_counter()
    labels = weak_labels(spec)
    jobs = [("weak", i) for i in range(spec.n_weak)] + [("strong", i) for i in range(spec.n_strong)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="synth", unit="scan")
    weak_rows, weak_nodes, strong_rows, strong_nodes = [], [], [], []
    fractions: dict[str, list[float]] = {"weak": [], "strong": []}
    for set_name, i in jobs:
        rng = patient_rng(spec.seed, set_name, i)
        if set_name == "weak":
            pid = _pid("W", i, spec.n_weak)
            scan = make_scan(rng, hospitals["A"], bool(labels[i]), spec.node_scale)
            write_volume(
                out / "weak/images" / f"{pid}.nii.gz", scan.hu.astype(np.int16), scan.geometry
            )
            write_volume(out / "weak_truth/masks" / f"{pid}.nii.gz", scan.instances, scan.geometry)
            weak_rows.append([pid, f"images/{pid}.nii.gz", int(scan.metastatic)])
            weak_nodes += _node_rows(pid, scan.nodes)
        else:
            pid = _pid("S", i, spec.n_strong)
            scan = make_scan(rng, hospitals["B"], None, spec.node_scale)
            write_volume(
                out / "strong/images" / f"{pid}.nii.gz", scan.hu.astype(np.int16), scan.geometry
            )
            write_volume(out / "strong/masks" / f"{pid}.nii.gz", scan.instances, scan.geometry)
            strong_rows.append([pid, f"images/{pid}.nii.gz", f"masks/{pid}.nii.gz"])
            strong_nodes += _node_rows(pid, scan.nodes)
        fractions[set_name].append(float(np.count_nonzero(scan.instances)) / scan.instances.size)

    write_text(out / "weak/manifest.csv", _csv(weak_rows, ("patient_id", "image", "label")))
    write_text(out / "weak_truth/nodes.csv", _csv(weak_nodes, NODE_COLUMNS))
    write_text(out / "strong/manifest.csv", _csv(strong_rows, ("patient_id", "image", "mask")))
    write_text(out / "strong/nodes.csv", _csv(strong_nodes, NODE_COLUMNS))

    def stats(v: list[float]) -> dict:
        a = np.asarray(v) if v else np.zeros(1)
        return {"mean": float(a.mean()), "max": float(a.max())}

    summary = {
        "n_weak": spec.n_weak,
        "n_weak_positive": int(sum(r[2] for r in weak_rows)),
        "n_strong": spec.n_strong,
        "n_strong_with_metastatic": len({r[0] for r in strong_nodes if r[6]}),
        "n_nodes_weak": len(weak_nodes),
        "n_nodes_strong": len(strong_nodes),
        "n_metastatic_nodes_weak": int(sum(r[6] for r in weak_nodes)),
        "n_metastatic_nodes_strong": int(sum(r[6] for r in strong_nodes)),
        "node_voxel_fraction": {k: stats(v) for k, v in fractions.items()},
        "shift": spec.shift,
        "node_scale": spec.node_scale,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(
        out / "synth.json",
        {
            "spec": asdict(spec),
            "summary": summary,
            "hospitals": {"weak": asdict(hospitals["A"]), "strong": asdict(hospitals["B"])},
        },
    )
    return summary
