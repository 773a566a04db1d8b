"""The slice stack of a DICOM series: its slices sorted along their normal and checked
(duplicates, gaps, uneven spacing, gantry tilt), and the regular grid they are resampled onto.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.io.dicom_headers import SliceHeader
from lymphdx.io.geometry import Geometry, to_sitk

__all__ = ["SliceStack", "build_stack"]

_SAME_POSITION_MM = 1e-3  # slices closer than this along the normal share a position
_ORIENTATION_TOL = 1e-3  # direction cosines that differ by more are different orientations


@dataclass(frozen=True)
class SliceStack:
    """The slices as acquired, sorted along their normal, and the regular grid for them.

    ``offsets`` are the slices' distances (mm) along the normal from the first one;
    ``shear`` is the in-plane shift (mm) of a slice per mm along the normal (zero except
    for gantry tilt). Vectors are in the LPS world frame.
    """

    files: tuple[Path, ...]
    u: tuple[float, float, float]  # direction of increasing column index (x)
    v: tuple[float, float, float]  # direction of increasing row index (y)
    n: tuple[float, float, float]  # slice normal u × v (z)
    spacing_xy: tuple[float, float]
    size_xy: tuple[int, int]
    origin: tuple[float, float, float]  # position of the first slice
    offsets: tuple[float, ...]
    step: float  # slice spacing of the regular grid
    shear: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uneven: bool = False
    tilted: bool = False

    @property
    def tilt_degrees(self) -> float:
        """Angle between the stacking direction and the slice normal."""
        return float(np.degrees(np.arctan(np.linalg.norm(self.shear))))

    @property
    def regular(self) -> bool:
        """True when the slices already lie on a regular rectangular grid."""
        return not (self.uneven or self.tilted)

    @property
    def raw_shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` shape of the stack as acquired (one plane per file)."""
        return (len(self.files), self.size_xy[1], self.size_xy[0])

    def stack_geometry(self) -> Geometry:
        """Rectangular geometry of the unsheared stack at spacing ``step`` from the first slice."""
        direction = np.column_stack([self.u, self.v, self.n]).ravel()
        return Geometry(
            (float(self.spacing_xy[0]), float(self.spacing_xy[1]), float(self.step)),
            tuple(float(o) for o in self.origin),  # type: ignore[arg-type]
            tuple(float(d) for d in direction),
        )

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous ``(x, y, z)`` indices on the as-acquired stack of LPS points (N, 3)."""
        pts = np.atleast_2d(np.asarray(points, dtype=float))
        u, v, n, g = (np.asarray(a) for a in (self.u, self.v, self.n, self.shear))
        rel = pts - np.asarray(self.origin)
        s = rel @ n
        inplane = rel - np.outer(s, n + g)
        x = inplane @ u / self.spacing_xy[0]
        y = inplane @ v / self.spacing_xy[1]
        offsets = np.asarray(self.offsets)
        z = np.interp(s, offsets, np.arange(len(offsets), dtype=float))
        z = np.where(s < 0, s / self.step, z)
        z = np.where(s > offsets[-1], len(offsets) - 1 + (s - offsets[-1]) / self.step, z)
        return np.column_stack([x, y, z])

    def to_regular(
        self, array: np.ndarray, nearest: bool = False, fill: float | None = None
    ) -> tuple[np.ndarray, Geometry]:
        """Put a ``(z, y, x)`` array on the as-acquired stack onto the regular grid.

        Linear interpolation for images, nearest neighbour for masks (``nearest``).
        ``fill`` is the value outside the stack after a tilt correction (default: the
        array's minimum for images, 0 for masks).
        """
        if array.shape != self.raw_shape:
            raise ValueError(f"array shape {array.shape} is not the stack's {self.raw_shape}")
        geometry = self.stack_geometry()
        if self.uneven:
            s = np.asarray(self.offsets)
            s_out = np.arange(_n_regular(s[-1], self.step)) * self.step
            i = np.clip(np.searchsorted(s, s_out, side="right") - 1, 0, len(s) - 2)
            w = np.clip((s_out - s[i]) / (s[i + 1] - s[i]), 0.0, 1.0)
            if nearest:
                array = array[np.where(w < 0.5, i, i + 1)]
            else:
                w3 = w[:, None, None].astype(np.float32)
                array = (1 - w3) * array[i] + w3 * array[i + 1]
        if not self.tilted:
            return array, geometry
        return self._unshear(array, geometry, nearest, fill)

    def _unshear(
        self, array: np.ndarray, geometry: Geometry, nearest: bool, fill: float | None
    ) -> tuple[np.ndarray, Geometry]:
        """Resample a sheared (gantry-tilted) stack onto a rectangular grid covering it."""
        u, v, n, g = (np.asarray(a) for a in (self.u, self.v, self.n, self.shear))
        p0 = np.asarray(self.origin)
        nz, ny, nx = array.shape
        dx, dy = self.spacing_xy
        height = (nz - 1) * self.step
        shift_u, shift_v = height * float(g @ u), height * float(g @ v)
        u_lo, u_hi = min(0.0, shift_u), (nx - 1) * dx + max(0.0, shift_u)
        v_lo, v_hi = min(0.0, shift_v), (ny - 1) * dy + max(0.0, shift_v)
        size = (
            int(np.ceil((u_hi - u_lo) / dx - 1e-6)) + 1,
            int(np.ceil((v_hi - v_lo) / dy - 1e-6)) + 1,
            nz,
        )
        origin = p0 + u_lo * u + v_lo * v
        # A point w of the true (sheared) stack lies at w - g ((w - p0)·n) on the unsheared one.
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(tuple((np.eye(3) - np.outer(g, n)).ravel()))
        transform.SetCenter(tuple(p0))
        if fill is None:
            fill = 0.0 if nearest else float(array.min())
        out_geometry = Geometry(
            geometry.spacing, tuple(float(o) for o in origin), geometry.direction
        )
        source = to_sitk(array, geometry)
        resampled = sitk.Resample(
            source,
            size,
            transform,
            sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
            out_geometry.origin,
            out_geometry.spacing,
            out_geometry.direction,
            float(fill),
            source.GetPixelID(),
        )
        return sitk.GetArrayFromImage(resampled), out_geometry


def _n_regular(length: float, step: float) -> int:
    """Slices of a regular grid at ``step`` from 0 that stay within ``length`` (mm)."""
    return int(np.floor(length / step + 1e-3)) + 1


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def build_stack(
    slices: tuple[SliceHeader, ...] | list[SliceHeader],
    folder: Path,
    patient: str | None = None,
    tilt: Literal["resample", "refuse"] = "resample",
) -> tuple[SliceStack, list[str]]:
    """Sort and check a series' slices; returns the stack and the warnings about it.

    Raises:
        InputError: missing geometry tags, mixed orientations or sizes, multi-frame
            objects, different slices at one position, positions off a straight line,
            a single slice, or gantry tilt with ``tilt="refuse"``.
    """
    warnings: list[str] = []
    for s in slices:
        if s.frames > 1:
            raise InputError(
                f"multi-frame DICOM object ({s.frames} frames in one file) is not "
                "supported; export the series as one file per slice",
                s.path,
                patient,
            )
        for tag, value in (
            ("ImagePositionPatient", s.position),
            ("ImageOrientationPatient", s.orientation),
            ("PixelSpacing", s.pixel_spacing),
        ):
            if value is None:
                raise InputError(
                    f"slice has no valid {tag}; cannot place it in 3-D", s.path, patient
                )
    first = slices[0]
    o0 = np.asarray(first.orientation)
    for s in slices[1:]:
        if np.max(np.abs(np.asarray(s.orientation) - o0)) > _ORIENTATION_TOL:
            raise InputError(
                f"slices have different orientations ({first.path.name}: {first.orientation}; "
                f"{s.path.name}: {s.orientation}); the series mixes stacks, split it",
                folder,
                patient,
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(
                f"slices have different sizes ({first.path.name}: {first.rows}x{first.columns}; "
                f"{s.path.name}: {s.rows}x{s.columns} rows x columns)",
                folder,
                patient,
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):  # type: ignore[arg-type]
            raise InputError(
                f"slices have different PixelSpacing ({first.path.name}: "
                f"{first.pixel_spacing}; {s.path.name}: {s.pixel_spacing})",
                folder,
                patient,
            )
    u, v = o0[:3], o0[3:]
    if min(np.linalg.norm(u), np.linalg.norm(v)) < 0.5 or abs(_unit(u) @ _unit(v)) > 0.01:
        raise InputError(
            f"ImageOrientationPatient {first.orientation} is not two orthogonal unit vectors",
            first.path,
            patient,
        )
    u = _unit(u)
    v = _unit(v - (v @ u) * u)
    n = np.cross(u, v)
    dy, dx = (float(x) for x in first.pixel_spacing)  # type: ignore[misc]
    if min(dx, dy) <= 0:
        raise InputError(f"PixelSpacing {first.pixel_spacing} is not positive", first.path, patient)

    positions = np.asarray([s.position for s in slices], dtype=float)
    order = np.argsort(positions @ n, kind="stable")
    ordered = [slices[i] for i in order]
    positions = positions[order]
    s_all = (positions - positions[0]) @ n
    keep = [0]
    for k in range(1, len(ordered)):
        if s_all[k] - s_all[keep[-1]] > _SAME_POSITION_MM:
            keep.append(k)
            continue
        a, b = ordered[keep[-1]], ordered[k]
        if a.sop_uid and a.sop_uid == b.sop_uid:
            warnings.append(
                f"file {b.path.name} duplicates {a.path.name} (same SOPInstanceUID): ignored"
            )
            continue
        raise InputError(
            f"2 different slices lie at the same position ({a.path.name} and {b.path.name}, "
            f"{s_all[k]:.3f} mm along the slice normal): the series holds several volumes "
            "(phases, echoes or reconstructions); put each in its own folder",
            folder,
            patient,
        )
    ordered = [ordered[k] for k in keep]
    positions = positions[keep]
    if len(ordered) < 2:
        raise InputError(
            "the series has a single slice: not a 3-D volume", first.path.parent, patient
        )
    rel = positions - positions[0]
    s = rel @ n
    # In-plane offsets of the slices: zero for a stack along its normal, proportional to
    # s (a shear) for gantry tilt, anything else for a stack that is not a straight line.
    off = rel - np.outer(s, n)
    shear = (s @ off) / (s @ s)
    residual = np.linalg.norm(off - np.outer(s, shear), axis=1)
    tol = max(0.1 * min(dx, dy), 0.01)
    if residual.max() > tol:
        k = int(np.argmax(residual))
        raise InputError(
            f"slice positions do not lie on one straight line: {ordered[k].path.name} is "
            f"{residual[k]:.2f} mm off the line through the others",
            folder,
            patient,
        )
    tilted = float(np.linalg.norm(shear)) * s[-1] > tol
    if not tilted:
        shear = np.zeros(3)
    diffs = np.diff(s)
    mean_step = s[-1] / (len(s) - 1)
    uneven = bool(np.max(np.abs(s - np.arange(len(s)) * mean_step)) > max(0.05 * mean_step, 0.005))
    step = mean_step
    if uneven:
        median = float(np.median(diffs))
        step = float(diffs.min()) if diffs.min() >= 0.5 * median else median
        for k in np.flatnonzero(diffs > 1.5 * step):
            missing = int(round(diffs[k] / step)) - 1
            warnings.append(
                f"gap of {diffs[k]:.2f} mm between the slices at {s[k]:.2f} and "
                f"{s[k + 1]:.2f} mm along the slice normal (files {ordered[k].path.name} and "
                f"{ordered[k + 1].path.name}) where the spacing is {step:.2f} mm: about "
                f"{missing} slice(s) missing"
            )
        if not any(diffs > 1.5 * step):
            warnings.append(
                f"uneven slice spacing: steps from {diffs.min():.3f} to {diffs.max():.3f} mm"
            )
        n_out = _n_regular(s[-1], step)
        warnings.append(
            f"resampled to {n_out} slices {step:.3f} mm apart (linear interpolation between "
            f"neighbouring slices; {len(s)} slices were read)"
        )
    stack = SliceStack(
        files=tuple(x.path for x in ordered),
        u=tuple(u),  # type: ignore[arg-type]
        v=tuple(v),  # type: ignore[arg-type]
        n=tuple(n),  # type: ignore[arg-type]
        spacing_xy=(dx, dy),
        size_xy=(first.columns, first.rows),
        origin=tuple(positions[0]),  # type: ignore[arg-type]
        offsets=tuple(float(x) for x in s),
        step=float(step),
        shear=tuple(float(x) for x in shear),  # type: ignore[arg-type]
        uneven=uneven,
        tilted=tilted,
    )
    if tilted:
        angle = stack.tilt_degrees
        if tilt == "refuse":
            raise InputError(
                f"gantry tilt of {angle:.1f}° (each slice is shifted "
                f"{np.linalg.norm(shear) * step:.2f} mm in plane against the last); read it "
                "with tilt='resample' or export a tilt-corrected series",
                folder,
                patient,
            )
        warnings.append(
            f"gantry tilt of {angle:.1f}°: the sheared stack was resampled onto a rectangular "
            "grid (linear interpolation), which covers all of it"
        )
    return stack, warnings
