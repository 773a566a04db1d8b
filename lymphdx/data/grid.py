"""The canonical grid of a scan, coverage checks, and resampling onto and off the grid.

Every volume is mapped by ONE SimpleITK resample onto a canonical grid (``canonical_grid``:
identity direction, ``DataConfig.shape`` voxels, centred on the input's field of view);
``check_coverage`` refuses a scan far too small for it, ``coverage_warning`` warns about one
that fills little of it, and ``to_original`` maps an array on the grid back onto the scan's
own grid. See ``lymphdx.data.preprocess`` for the whole preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lymphdx.core.config import DataConfig
from lymphdx.core.errors import InputError
from lymphdx.io.geometry import Geometry, to_sitk

__all__ = [
    "COVERAGE_WARNING",
    "Grid",
    "MAX_STRETCH",
    "canonical_grid",
    "check_coverage",
    "coverage",
    "coverage_warning",
    "preprocess_image",
    "resample_image",
    "resample_labels",
    "resample_mask",
    "to_original",
]

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """A canonical sampling grid: ``geometry`` (identity direction) and ``size_xyz`` voxels."""

    geometry: Geometry
    size_xyz: tuple[int, int, int]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)`` of data on this grid."""
        x, y, z = self.size_xyz
        return (z, y, x)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (lists of floats/ints)."""
        return {
            "spacing": list(self.geometry.spacing),
            "origin": list(self.geometry.origin),
            "direction": list(self.geometry.direction),
            "size_xyz": list(self.size_xyz),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grid:
        """Inverse of ``to_dict``."""
        geometry = Geometry(
            tuple(float(v) for v in data["spacing"]),
            tuple(float(v) for v in data["origin"]),
            tuple(float(v) for v in data["direction"]),
        )
        size = tuple(int(v) for v in data["size_xyz"])
        return cls(geometry, size)  # type: ignore[arg-type]


def canonical_grid(
    image_geometry: Geometry,
    image_size_xyz: tuple[int, int, int] | tuple[int, ...],
    cfg: DataConfig,
) -> Grid:
    """The canonical grid of an image with ``image_geometry`` and ``image_size_xyz`` voxels.

    Identity direction, ``cfg.shape`` voxels, centred on the centre of the input's field of
    view; spacing ``cfg.spacing`` (``fit="crop"``) or the input's world bounding-box extent
    divided by ``cfg.shape`` (``fit="resize"``). ``fit="whole"``: spacing ``cfg.spacing``
    and as many voxels as cover the input's world bounding box (rounded up), per scan.
    """
    size = np.asarray(image_size_xyz, dtype=np.float64)
    spacing = np.asarray(image_geometry.spacing, dtype=np.float64)
    direction = np.asarray(image_geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image_geometry.origin, dtype=np.float64)
    # Centre of the field of view = world position of the continuous index (size - 1) / 2.
    centre = origin + direction @ (spacing * (size - 1.0) / 2.0)
    if cfg.fit == "whole":  # the world bounding box of the voxel-edge box, at spacing
        out_spacing = np.asarray(cfg.spacing, dtype=np.float64)
        extent = np.abs(direction) @ (spacing * size)
        n = np.maximum(1, np.ceil(extent / out_spacing - 1e-6)).astype(int)
        out_origin = centre - out_spacing * (n - 1.0) / 2.0
        geometry = Geometry(
            tuple(float(v) for v in out_spacing), tuple(float(v) for v in out_origin), _IDENTITY
        )
        return Grid(geometry, tuple(int(v) for v in n))  # type: ignore[arg-type]
    shape = np.asarray(cfg.shape, dtype=np.float64)
    if cfg.fit == "crop":
        out_spacing = np.asarray(cfg.spacing, dtype=np.float64)
    else:
        # World-axis bounding box of the voxel-edge box (exact for axis-aligned scans).
        extent = np.abs(direction) @ (spacing * size)
        out_spacing = extent / shape
    out_origin = centre - out_spacing * (shape - 1.0) / 2.0
    geometry = Geometry(
        tuple(float(v) for v in out_spacing),
        tuple(float(v) for v in out_origin),
        _IDENTITY,
    )
    return Grid(geometry, tuple(int(v) for v in cfg.shape))  # type: ignore[arg-type]


#: With ``fit="resize"``, the canonical grid may be at most this many times finer than the
#: scan along an axis; a scan with fewer voxels is stretched into interpolation, not anatomy.
MAX_STRETCH = 16


def check_coverage(
    geometry: Geometry,
    size_xyz: tuple[int, ...],
    cfg: DataConfig,
    path: str | Path | None = None,
    patient: str | None = None,
) -> None:
    """Refuse a scan far too small for the canonical grid (a localizer, a crop, a bad header).

    ``fit="crop"``: the scan must span at least one grid voxel (``cfg.spacing``) along each
    world axis; a thinner scan would be a slab of at most one slice of the model's input,
    the rest padding. ``fit="resize"``: the grid may be at most ``MAX_STRETCH`` times finer
    than the scan along each axis.

    Raises:
        InputError: naming the file, the patient, the scan's extent and the grid's.
    """
    size = np.asarray(size_xyz, dtype=np.float64)
    direction = np.abs(np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3))
    extent = direction @ (np.asarray(geometry.spacing, dtype=np.float64) * size)  # world mm
    mm = " x ".join(f"{v:.3g}" for v in extent)
    if cfg.fit in ("crop", "whole"):
        grid = np.asarray(cfg.spacing, dtype=np.float64)
        short = [axis for axis, e, g in zip("xyz", extent, grid, strict=True) if e < g]
        if short:
            raise InputError(
                f"the scan is far too small for the model: it spans {mm} mm (x, y, z), less "
                f"than one voxel of the model's input grid ({' x '.join(map(str, cfg.spacing))}"
                f" mm, data.spacing) along {', '.join(short)}; is it a localizer, a crop or "
                "a file with a wrong voxel size?",
                path,
                patient,
            )
        return
    voxels = direction @ size  # voxels along each world axis (exact when axis-aligned)
    stretch = np.asarray(cfg.shape, dtype=np.float64) / np.maximum(voxels, 1e-9)
    short = [axis for axis, s in zip("xyz", stretch, strict=True) if s > MAX_STRETCH]
    if short:
        have = " x ".join(f"{v:.3g}" for v in voxels)
        raise InputError(
            f"the scan is far too small for the model: it has {have} voxels (x, y, z), and "
            f"resizing it onto the model's input ({' x '.join(map(str, cfg.shape))}, "
            f"data.shape) would stretch it more than {MAX_STRETCH} times along "
            f"{', '.join(short)}; is it a localizer or a crop?",
            path,
            patient,
        )


#: ``coverage_warning`` warns when a scan fills less than this share of the model's input.
COVERAGE_WARNING = 0.5


def coverage(
    geometry: Geometry, size_xyz: tuple[int, ...], cfg: DataConfig
) -> tuple[float, tuple[float, float, float]]:
    """How much of the model's input a scan fills: ``(overall, (x, y, z))``, each in [0, 1].

    ``fit="crop"``: the scan's world extent over the input's field of view
    (``spacing × shape``) along each axis; ``fit="resize"``: the scan's voxels over the
    input's (what is not covered is interpolation). Overall: the product of the axes.
    """
    if cfg.fit == "whole":  # the grid is the scan's field of view
        return 1.0, (1.0, 1.0, 1.0)
    size = np.asarray(size_xyz, dtype=np.float64)
    direction = np.abs(np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3))
    shape = np.asarray(cfg.shape, dtype=np.float64)
    if cfg.fit == "crop":
        extent = direction @ (np.asarray(geometry.spacing, dtype=np.float64) * size)
        share = extent / (np.asarray(cfg.spacing, dtype=np.float64) * shape)
    else:
        share = (direction @ size) / shape
    axes = tuple(float(min(1.0, max(0.0, v))) for v in share)
    return float(np.prod(axes)), axes  # type: ignore[return-value]


def coverage_warning(geometry: Geometry, size_xyz: tuple[int, ...], cfg: DataConfig) -> str | None:
    """A one-line warning when the scan fills far less than the model's input
    (``COVERAGE_WARNING``), else None: the rest of the input is padding, and a probability
    computed mostly from padding looks like any other."""
    overall, axes = coverage(geometry, size_xyz, cfg)
    if overall >= COVERAGE_WARNING:
        return None
    per_axis = ", ".join(f"{a * 100:.0f} %" for a in axes)
    if cfg.fit == "crop":
        fov = " x ".join(f"{s * n:g}" for s, n in zip(cfg.spacing, cfg.shape, strict=True))
        what = f"its field of view of {fov} mm (data.spacing x data.shape)"
    else:
        what = f"its {' x '.join(map(str, cfg.shape))} voxels (data.shape)"
    return (
        f"the scan fills only {overall * 100:.1f} % of the model's input ({per_axis} of "
        f"{what} along x, y, z); the rest is padding, so the probability means little: "
        "give the whole scan, not a crop or a few slices"
    )


# --------------------------------------------------------------------------- resampling


def _resample(
    image: sitk.Image, grid: Grid, interpolator: int, default: float, pixel_type: int
) -> np.ndarray:
    g = grid.geometry
    out = sitk.Resample(
        image,
        [int(v) for v in grid.size_xyz],
        sitk.Transform(),
        interpolator,
        g.origin,
        g.spacing,
        g.direction,
        float(default),
        pixel_type,
    )
    return sitk.GetArrayFromImage(out)


def resample_image(image: sitk.Image, grid: Grid, cfg: DataConfig) -> np.ndarray:
    """Image → ``grid.shape_zyx`` float32 array in HU, linear, outside = low, clipped to window."""
    lo, hi = (float(v) for v in cfg.hu_window)
    array = _resample(image, grid, sitk.sitkLinear, lo, sitk.sitkFloat32)
    array = np.asarray(array, dtype=np.float32)
    np.clip(array, lo, hi, out=array)
    return array


def resample_labels(labels: sitk.Image, grid: Grid) -> np.ndarray:
    """Label image (e.g. node instance ids) → ``grid.shape_zyx`` array of its own pixel
    type, nearest neighbour, 0 outside: each label kept as it is."""
    return _resample(labels, grid, sitk.sitkNearestNeighbor, 0.0, labels.GetPixelID())


def resample_mask(mask: sitk.Image, grid: Grid) -> np.ndarray:
    """Mask (nonzero = node; instance ids allowed) → ``grid.shape_zyx`` uint8 0/1, nearest."""
    return (resample_labels(mask, grid) != 0).astype(np.uint8)


def preprocess_image(image: sitk.Image, cfg: DataConfig) -> tuple[np.ndarray, Grid]:
    """Canonical grid of ``image`` and the image resampled onto it (``(z, y, x)`` float32)."""
    grid = canonical_grid(Geometry.of(image), tuple(image.GetSize()), cfg)
    return resample_image(image, grid, cfg), grid


def to_original(
    array_zyx: np.ndarray, grid: Grid, reference: sitk.Image, nearest: bool = False
) -> sitk.Image:
    """Map a ``grid.shape_zyx`` array (e.g. ROI probabilities) back onto ``reference``'s grid.

    Linear interpolation (float32 output) by default; ``nearest=True`` keeps the input's
    dtype (use it for label maps). Outside the canonical grid → 0. The result has exactly
    ``reference``'s size, spacing, origin and direction.
    """
    array = np.asarray(array_zyx)
    if tuple(array.shape) != grid.shape_zyx:
        raise ValueError(f"array shape {array.shape} (z, y, x) differs from grid {grid.shape_zyx}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not nearest:
        array = array.astype(np.float32, copy=False)
    source = to_sitk(array, grid.geometry)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(source, reference, sitk.Transform(), interpolator, 0.0)
