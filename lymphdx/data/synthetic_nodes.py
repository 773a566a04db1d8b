"""The synthetic phantom's lymph nodes (for ``lymphdx.data.synthetic``).

A node population (``NodePopulation``, ``lymphdx synth --phantom``) draws a node as a
``NodeDraw``: ``SCALED`` here, today's phantom, whose nodes are large enough for the quick
preset's grid; ``REALISTIC`` in ``lymphdx.data.synthetic_realistic``. A drawn node is
placed in node fat near a vessel on the hospital's reference grid (``place_node``), drawn
into the mask of the scan's own grid (``rasterise_node``: the same node in mm at every
resolution) and rendered with a partial-volume edge (``render_node``). An irregular margin
(``Margin``) perturbs the ellipsoid's surface along each direction from its centre.
Arrays are ``(z, y, x)``; points, axes and spacing ``(x, y, z)`` in mm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lymphdx.data.synthetic_anatomy import (
    PhantomGrid,
    Tissue,
    _Ellipsoid,
    _ellipsoid,
    _random_rotation,
    smooth_noise,
)

__all__ = [
    "BENIGN_DIAMETER",
    "BENIGN_ROUNDNESS",
    "METASTATIC_DIAMETER",
    "METASTATIC_ROUNDNESS",
    "NODE_XY_RANGE_MM",
    "NODE_Z_RANGE_MM",
    "SCALED",
    "Margin",
    "NodeDraw",
    "NodePopulation",
    "draw_node",
    "node_shape",
    "place_node",
    "rasterise_node",
    "render_node",
]


# The scaled population (equivalent diameters in mm; roundness = short / long axis).
BENIGN_DIAMETER = (10.0, 22.0)
METASTATIC_DIAMETER = (14.0, 34.0)
BENIGN_ROUNDNESS = (0.40, 0.85)  # skewed towards oval: mean ≈ 0.58
METASTATIC_ROUNDNESS = (0.60, 1.0)  # skewed towards round: mean ≈ 0.85
NODE_XY_RANGE_MM = 100.0  # node centres within ± this of the volume centre (x, y)
NODE_Z_RANGE_MM = 75.0  # ... and within ± this (z): whole nodes stay in the 192 mm crop


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``(n, 3)`` nearly uniform unit vectors (a fixed set: no generator)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5**0.5) * i
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


_SPHERE = _fibonacci_sphere(2000)
MARGIN_CLIP = 2.0  # |F| <= this: the perturbed surface stays star-shaped for amplitude < 0.5


@dataclass
class Margin:
    """An irregular margin: along direction ``n`` (a unit vector of the node's frame, in
    coordinates normalised by the semi-axes) the surface lies at normalised radius
    ``c * (1 + amplitude * F(n))``, where ``F`` is a sum of plane waves on the unit sphere
    scaled to zero mean and unit sd over all directions and clipped to ``±MARGIN_CLIP``,
    and ``c`` keeps the node's volume that of its ellipsoid. ``amplitude`` is so the sd of
    the surface's radial displacement, as a fraction of the radius."""

    amplitude: float
    directions: np.ndarray  # (K, 3) unit vectors
    frequencies: np.ndarray  # (K,) radians per unit of n . direction
    phases: np.ndarray  # (K,)
    offset: float = 0.0  # mean of the raw sum over the sphere
    norm: float = 1.0  # 1 / its sd
    volume_scale: float = 1.0  # c

    @classmethod
    def draw(cls, rng: np.random.Generator, amplitude: float, waves: int = 6) -> Margin:
        """``waves`` plane waves of 1-2.5 cycles across the node: a few lobes."""
        directions = rng.standard_normal((waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        margin = cls(
            float(amplitude),
            directions,
            rng.uniform(np.pi, 2.5 * np.pi, waves),
            rng.uniform(0, 2 * np.pi, waves),
        )
        raw = margin._raw(tuple(_SPHERE.T))
        margin.offset, margin.norm = float(raw.mean()), 1.0 / float(raw.std())
        # a star-shaped body's volume is the sphere's mean of r^3 times the unit ball's
        r = 1.0 + margin.amplitude * margin.radial(tuple(_SPHERE.T))
        margin.volume_scale = float(np.mean(r.astype(float) ** 3)) ** (-1 / 3)
        return margin

    def _raw(self, n) -> np.ndarray:
        out = np.zeros(np.broadcast_shapes(*(np.shape(c) for c in n)), np.float32)
        for v, f, p in zip(self.directions, self.frequencies, self.phases, strict=True):
            out += np.sin(f * (v[0] * n[0] + v[1] * n[1] + v[2] * n[2]) + p).astype(np.float32)
        return out

    def radial(self, n) -> np.ndarray:
        """``F(n)`` for unit vectors given as three arrays (their components)."""
        f = (self._raw(n) - np.float32(self.offset)) * np.float32(self.norm)
        return np.clip(f, -MARGIN_CLIP, MARGIN_CLIP)

    def surface(self, n) -> np.ndarray:
        """The surface's normalised radius along ``n``: ``c * (1 + amplitude * F(n))``."""
        return np.float32(self.volume_scale) * (1.0 + np.float32(self.amplitude) * self.radial(n))


@dataclass
class NodeDraw:
    """One lymph node as drawn, before it is placed: size, shape, orientation, intensities.

    ``texture_hu`` and ``texture_sigma_mm`` (None: the scaled phantom's 14 HU at 1 voxel
    when heterogeneous, else 3 HU at 1.5 voxels, voxels of the hospital's reference grid)
    give the node's enhancement texture; ``margin`` (None: a smooth ellipsoid) its margin.
    """

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
    texture_hu: float | None = None
    texture_sigma_mm: float | None = None
    margin: Margin | None = None

    @property
    def margin_irregularity(self) -> float:
        """The margin's ``amplitude`` (0 for a smooth ellipsoid)."""
        return 0.0 if self.margin is None else self.margin.amplitude


@dataclass(frozen=True)
class NodePopulation:
    """A phantom's node population (``lymphdx synth --phantom``): ``draw(rng, metastatic,
    scale)`` draws one node (``scale``: ``--node-scale``); ``fat_margin_mm``: how far
    around the node ``place_node`` wants node fat too on the reference grid (a small node
    covers few of its voxels, so on a finer grid its edge would otherwise reach past the
    fat)."""

    name: str
    draw: Callable[[np.random.Generator, bool, float], NodeDraw]
    fat_margin_mm: float = 0.0


def _semi_axes(diameter: float, roundness: float, middle: float) -> np.ndarray:
    """Semi-axes (long, middle, short) with the given equivalent diameter and ratios."""
    long = diameter / 2.0 / (middle * roundness) ** (1 / 3)
    return np.array([long, long * middle, long * roundness])


def draw_node(rng: np.random.Generator, metastatic: bool, scale: float = 1.0) -> NodeDraw:
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
    return NodeDraw(
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


SCALED = NodePopulation("scaled", draw_node)


def node_shape(grid: PhantomGrid, center, nd: NodeDraw, pad: float) -> _Ellipsoid | None:
    """The node's ellipsoid on its bounding box (grown by ``pad`` mm), its surface moved by
    ``nd.margin``: ``r`` and ``d`` (normalised radius, signed distance in mm, < 0 inside)
    are those of the perturbed surface (``d`` along the ray from the centre)."""
    if nd.margin is None:
        return _ellipsoid(grid, center, nd.semi, nd.rot, pad=pad)
    grow = nd.margin.volume_scale * (1 + MARGIN_CLIP * nd.margin.amplitude) - 1.0
    e = _ellipsoid(grid, center, nd.semi, nd.rot, pad=pad + max(grow, 0.0) * float(nd.semi[0]))
    if e is None:
        return None
    p = [e.u[i] / np.float32(nd.semi[i]) for i in range(3)]
    with np.errstate(divide="ignore", invalid="ignore"):
        n = [np.where(e.r > 0, c / e.r, 0.0) for c in p]
        reach = np.where(e.r > 0, np.sqrt(sum(u * u for u in e.u)) / e.r, 0.0)  # mm to the surface
    surface = nd.margin.surface(n)
    r = (e.r / surface).astype(np.float32)
    d = (e.d - (surface - 1.0) * reach).astype(np.float32)
    return _Ellipsoid(e.sl, e.u, r, d)


def place_node(
    rng: np.random.Generator,
    grid: PhantomGrid,
    labels: np.ndarray,
    instances: np.ndarray,
    vessels: list,
    nd: NodeDraw,
    node_id: int,
    vc: np.ndarray,
    tries: int = 400,
    fat_margin: float = 0.0,
) -> tuple[float, float, float] | None:
    """Find a spot in node fat near a vessel, rasterise the node into ``instances``.

    The node (plus a one-voxel gap to other nodes, and ``fat_margin`` mm of node fat
    around it) must lie entirely in retroperitoneal or mesenteric fat. Returns the centre
    (world mm) or None when no spot was found.
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
        e = node_shape(grid, c, nd, pad=max(2 * gap, fat_margin))
        if e is None:
            continue
        inside = e.d <= 0
        ci = grid.index_of(c)
        local = tuple(ci[k] - e.sl[k].start for k in range(3))
        if not all(0 <= local[k] < inside.shape[k] for k in range(3)):
            continue
        inside[local] = True  # a node always covers the voxel nearest its centre
        lab = labels[e.sl]
        needs_fat = inside | (e.d <= fat_margin) if fat_margin > 0 else inside
        if not np.isin(lab[needs_fat], Tissue.NODE_FAT).all():
            continue
        if np.any(instances[e.sl][(e.d <= gap) | inside] != 0):
            continue
        instances[e.sl][inside] = node_id
        return (float(c[0]), float(c[1]), float(c[2]))
    return None


def rasterise_node(
    grid: PhantomGrid,
    labels: np.ndarray,
    instances: np.ndarray,
    nd: NodeDraw,
    center,
    node_id: int,
) -> None:
    """Draw a node placed on the reference grid (``place_node``) into ``instances`` of
    another grid ``(z, y, x)``: its voxels inside the surface, in node fat and not taken
    by another node, and always the voxel nearest its centre (unless taken)."""
    e = node_shape(grid, center, nd, pad=0.0)
    if e is None:
        return
    inside = e.d <= 0
    sub = instances[e.sl]
    free = sub == 0
    allowed = free & np.isin(labels[e.sl], Tissue.NODE_FAT)
    ci = grid.index_of(center)
    local = tuple(ci[k] - e.sl[k].start for k in range(3))
    if all(0 <= local[k] < inside.shape[k] for k in range(3)):
        inside[local] = True
        allowed[local] = free[local]
    sub[inside & allowed] = node_id


def render_node(
    rng: np.random.Generator,
    grid: PhantomGrid,
    image: np.ndarray,
    center,
    nd: NodeDraw,
    texture_gain: float,
) -> None:
    """Blend the node's HU into ``image`` with a one-voxel partial-volume edge."""
    h = grid.h
    e = node_shape(grid, center, nd, pad=1.5 * h)
    # Partial volume over ~0.6 voxel: a little sharper than a box voxel's, so that small
    # nodes keep some contrast after the PSF on 4-5 mm voxels.
    w = np.clip(0.5 - e.d / (0.6 * h), 0.0, 1.0)
    amp = (14.0 if nd.heterogeneous else 3.0) if nd.texture_hu is None else nd.texture_hu
    if nd.texture_sigma_mm is None:
        sigma = grid.base_voxels(1.0 if nd.heterogeneous else 1.5)
    else:
        sigma = grid.mm_voxels(nd.texture_sigma_mm)
    val = nd.hu + amp * texture_gain * smooth_noise(rng, w.shape, sigma)
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
