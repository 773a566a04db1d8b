"""DICOM series reading that survives real exports.

pydicom reads the headers (no pixels) to group, choose, sort and check the slices;
SimpleITK/GDCM decodes the pixels one file at a time (pydicom's installed decoders are
the fallback), each slice with its own RescaleSlope/Intercept, so values are in HU.

What the reader does with the faults of real exports (each is said in the report's
``warnings``/``notes`` and logged to the ``lymphdx`` logger):

- slice order: by position along the slice normal, never by file name or InstanceNumber;
- several series in one folder: refused unless one is chosen by SeriesInstanceUID
  (``series_uid``) or by the rule "most slices of an axial CT" (``pick_largest``);
- missing or unevenly spaced slices: a warning names each gap, then the stack is
  resampled (linear interpolation between neighbouring slices) onto a regular grid at the
  smallest slice spacing found;
- oblique slices stacked along their normal: read exactly, the orientation goes into the
  direction matrix (no resampling);
- gantry tilt (slices sheared: each one shifted in plane against the last): resampled
  onto a rectangular grid by default, or refused with ``tilt="refuse"``;
- non-CT modalities: refused unless ``allow_non_ct``;
- compressed transfer syntaxes: whatever GDCM (JPEG, JPEG-LS, JPEG 2000, RLE) or pydicom's
  installed plugins decode; anything else is refused with the transfer syntax named;
- duplicates of one slice (same SOPInstanceUID) are dropped; different slices at one
  position, mixed orientations or sizes, multi-frame objects are refused.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.io.volumes import MAX_VOXELS, Geometry, to_sitk

__all__ = [
    "DicomReport",
    "DicomSeries",
    "SeriesSummary",
    "SliceHeader",
    "SliceStack",
    "build_stack",
    "choose_series",
    "read_dicom_series",
    "scan_folder",
]

log = logging.getLogger("lymphdx")

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
]
_SAME_POSITION_MM = 1e-3  # slices closer than this along the normal share a position
_ORIENTATION_TOL = 1e-3  # direction cosines that differ by more are different orientations
_AXIAL_COS = float(np.cos(np.radians(45)))  # an axial stack's normal is within 45° of z


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class SliceHeader:
    """What the reader needs from one DICOM image file's header."""

    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    series_number: int | None
    description: str
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines: row then column
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    rows: int
    columns: int
    frames: int
    transfer_syntax: str


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _read_header(path: Path, patient: str | None = None) -> SliceHeader | None:
    """The header of an image file, or None for a non-DICOM or non-image file.

    Raises:
        InputError: a DICOM image file whose header values cannot be decoded.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except Exception:  # noqa: BLE001 - pydicom raises many types for a non-DICOM file
        if path.suffix.lower() != ".dcm":
            return None
        try:  # some exports have no preamble/file meta; trust only a .dcm name for that
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
        except Exception:  # noqa: BLE001 - any parser failure means "not a readable DICOM"
            return None
    try:
        if "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
            return None  # DICOMDIR, structured reports, presentation states, ...
        return _header_of(ds, path)
    except Exception as err:  # noqa: BLE001 - values are decoded lazily, any may be damaged
        text = str(err).strip()
        first = text.splitlines()[0][:160] if text else type(err).__name__
        raise InputError(
            f"damaged DICOM header ({first}); export the series again", path, patient
        ) from None


def _header_of(ds: Any, path: Path) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    try:
        number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None  # absent or unreadable: only used to order series
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or "").upper(),
        series_number=number,
        description=str(ds.get("SeriesDescription", "") or ""),
        image_type=tuple(str(t).upper() for t in image_type),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=frames,
        transfer_syntax=syntax,
    )


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else "unknown"
    return f"{name} ({uid})" if uid and name != uid else (uid or "unknown")


def _orientation_label(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.99:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass(frozen=True)
class SeriesSummary:
    """The image files of one SeriesInstanceUID in a folder."""

    uid: str
    slices: tuple[SliceHeader, ...]

    @property
    def n_slices(self) -> int:
        """Number of image files."""
        return len(self.slices)

    @property
    def modality(self) -> str:
        """The most common Modality of the files ('' when absent)."""
        return Counter(s.modality for s in self.slices).most_common(1)[0][0]

    @property
    def series_number(self) -> int | None:
        """SeriesNumber of the first file."""
        return self.slices[0].series_number

    @property
    def normal(self) -> np.ndarray | None:
        """Slice normal (row × column direction) of the first file with an orientation."""
        for s in self.slices:
            if s.orientation is not None:
                o = np.asarray(s.orientation)
                n = np.cross(o[:3], o[3:])
                norm = float(np.linalg.norm(n))
                return n / norm if norm > 0 else None
        return None

    @property
    def is_axial(self) -> bool:
        """True when the slice normal lies within 45° of the patient's z axis."""
        n = self.normal
        return n is not None and abs(float(n[2])) >= _AXIAL_COS

    @property
    def is_localizer(self) -> bool:
        """True when the files say LOCALIZER (scout) in ImageType."""
        return any("LOCALIZER" in s.image_type for s in self.slices)

    def describe(self) -> str:
        """One line: UID, modality, orientation, slice count, description."""
        n = self.normal
        orient = _orientation_label(n) if n is not None else "no orientation"
        text = f"{self.uid} ({self.modality or 'no modality'}, {orient}, {self.n_slices} files"
        if self.is_localizer:
            text += ", localizer"
        if self.slices[0].description:
            text += f", {self.slices[0].description!r}"
        return text + ")"


def scan_folder(folder: str | Path, patient: str | None = None) -> tuple[list[SeriesSummary], int]:
    """The image series in ``folder`` (not recursive) and the number of other files.

    Series are sorted by SeriesNumber then UID.

    Raises:
        InputError: an image file whose header is damaged (names it and ``patient``).
    """
    folder = Path(folder)
    groups: dict[str, list[SliceHeader]] = {}
    others = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        header = _read_header(Path(entry.path), patient)
        if header is None:
            others += 1
            continue
        groups.setdefault(header.series_uid, []).append(header)
    series = [SeriesSummary(uid, tuple(slices)) for uid, slices in groups.items()]
    series.sort(key=lambda s: (s.series_number if s.series_number is not None else 1 << 30, s.uid))
    return series, others


def choose_series(
    series: list[SeriesSummary],
    folder: Path,
    patient: str | None = None,
    series_uid: str | None = None,
    pick_largest: bool = False,
) -> tuple[SeriesSummary, str]:
    """Pick one series; returns it and a sentence saying how it was chosen.

    With ``series_uid`` that series; else the only one; else, with ``pick_largest``, the
    one with most slices among axial non-localizer CT series (ties: lowest SeriesNumber).

    Raises:
        InputError: no series, an unknown ``series_uid``, or several without a rule.
    """
    if not series:
        hint = ""
        if any(p.is_dir() for p in folder.iterdir()):
            hint = " (it has subfolders: give the folder that holds the slice files)"
        raise InputError(f"folder holds no DICOM series{hint}", folder, patient)
    listing = "; ".join(s.describe() for s in series)
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s, f"series {s.uid} chosen by its SeriesInstanceUID"
        raise InputError(
            f"series {series_uid} is not in the folder; it holds {listing}", folder, patient
        )
    if len(series) == 1:
        return series[0], f"series {series[0].uid}, the only image series in the folder"
    if not pick_largest:
        raise InputError(
            f"folder holds {len(series)} DICOM series ({listing}); give a folder with "
            "exactly one, or choose one by its SeriesInstanceUID",
            folder,
            patient,
        )

    def rank(s: SeriesSummary) -> tuple:
        number = s.series_number if s.series_number is not None else 1 << 30
        return (s.modality == "CT", s.is_axial, not s.is_localizer, s.n_slices, -number)

    ranked = sorted(series, key=rank, reverse=True)
    best = ranked[0]
    tied = rank(ranked[1])[:4] == rank(best)[:4]
    tie = " (tied on slice count; lowest SeriesNumber taken)" if tied else ""
    return best, (
        f"series {best.uid} ({best.n_slices} slices) chosen by the rule 'most slices of an "
        f"axial CT'{tie} among {len(series)} series: {listing}"
    )


# --------------------------------------------------------------------------- geometry


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


# --------------------------------------------------------------------------- pixels


def _read_pixels(
    files: tuple[Path, ...], rows: int, columns: int, syntax: dict[Path, str], patient: str | None
) -> np.ndarray:
    """Decoded slices in HU, ``(z, y, x)`` float32, in the order of ``files``."""
    out = np.empty((len(files), rows, columns), np.float32)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetOutputPixelType(sitk.sitkFloat32)  # keeps RescaleSlope/Intercept exact
    for k, path in enumerate(files):
        try:
            reader.SetFileName(str(path))
            plane = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError:
            plane = _read_with_pydicom(path, syntax.get(path, ""), patient)
        plane = np.asarray(plane)
        if plane.ndim == 3:
            if plane.shape[0] != 1:
                raise InputError(f"slice file holds {plane.shape[0]} planes", path, patient)
            plane = plane[0]
        if plane.shape != (rows, columns):
            raise InputError(
                f"slice decodes to {plane.shape} pixels, its header says {(rows, columns)}",
                path,
                patient,
            )
        out[k] = plane
    return out


def _read_with_pydicom(path: Path, syntax: str, patient: str | None) -> np.ndarray:
    """Decode one slice with pydicom's installed plugins (GDCM could not)."""
    import pydicom
    from pydicom.pixels import apply_rescale

    try:
        ds = pydicom.dcmread(path)
        plane = apply_rescale(ds.pixel_array, ds)
    except MemoryError:  # a damaged length field asks for more bytes than there are
        raise InputError(
            "damaged DICOM file: an element claims more bytes than memory holds; export "
            "the series again",
            path,
            patient,
        ) from None
    except Exception as err:  # noqa: BLE001 - every decoder failure becomes one clear message
        text = str(err).strip()
        first = text.splitlines()[0][:160].rstrip(" :") if text else type(err).__name__
        raise InputError(
            f"cannot decode the pixel data (transfer syntax {_syntax_name(syntax)}): neither "
            f"SimpleITK/GDCM nor pydicom's installed decoders read it ({first}); export the "
            "series uncompressed (e.g. `gdcmconv --raw`) or install a pydicom decoder plugin",
            path,
            patient,
        ) from None
    return np.asarray(plane, dtype=np.float32)


# --------------------------------------------------------------------------- the reader


@dataclass
class DicomReport:
    """What the reader chose and found; ``warnings`` are also logged."""

    folder: str
    series_uid: str
    modality: str
    n_files: int  # slice files used
    choice: str
    transfer_syntaxes: list[str]
    size_xyz: tuple[int, int, int]
    resampled: bool
    tilt_degrees: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class DicomSeries:
    """A series read onto a regular grid: the image (float32 HU), its stack and report."""

    image: sitk.Image
    stack: SliceStack
    report: DicomReport

    @property
    def geometry(self) -> Geometry:
        """Geometry of ``image``."""
        return Geometry.of(self.image)

    def to_image_grid(self, array: np.ndarray, nearest: bool = True) -> np.ndarray:
        """A ``(z, y, x)`` array on the as-acquired stack (e.g. a mask) on ``image``'s grid."""
        out, _ = self.stack.to_regular(array, nearest=nearest)
        return out


def read_dicom_series(
    folder: str | Path,
    patient: str | None = None,
    *,
    series_uid: str | None = None,
    pick_largest: bool = False,
    allow_non_ct: bool = False,
    tilt: Literal["resample", "refuse"] = "resample",
) -> DicomSeries:
    """Read one DICOM series from ``folder`` (not recursive) onto a regular grid in HU.

    See the module docstring for what happens to each fault of real exports.

    Raises:
        InputError: naming the folder or file, the patient and the problem.
    """
    if tilt not in ("resample", "refuse"):
        raise ValueError(f"tilt must be 'resample' or 'refuse', got {tilt!r}")
    folder = Path(folder)
    series, others = scan_folder(folder, patient)
    chosen, choice = choose_series(series, folder, patient, series_uid, pick_largest)
    modality = chosen.modality
    if modality != "CT" and not allow_non_ct:
        raise InputError(
            f"series {chosen.uid} is {modality or 'of no stated modality'}, not CT; the "
            "models are for CT (read it anyway with allow_non_ct=True)",
            folder,
            patient,
        )
    stack, warnings = build_stack(chosen.slices, folder, patient, tilt)
    syntax = {s.path: s.transfer_syntax for s in chosen.slices}
    first = chosen.slices[0]
    voxels = len(stack.files) * first.rows * first.columns
    if voxels > MAX_VOXELS or min(first.rows, first.columns) < 1:
        raise InputError(
            f"the headers describe {len(stack.files)} slices of {first.rows} x "
            f"{first.columns} pixels: {'no' if voxels == 0 else voxels} voxels, not a CT "
            f"volume lymphdx reads (at most {MAX_VOXELS})",
            folder,
            patient,
        )
    array = _read_pixels(stack.files, first.rows, first.columns, syntax, patient)
    array, geometry = stack.to_regular(array)
    image = to_sitk(np.ascontiguousarray(array, dtype=np.float32), geometry)
    notes = [choice]
    if len(series) > 1:
        notes.append(f"{len(series) - 1} other series in the folder ignored")
    if others:
        notes.append(f"{others} non-image or non-DICOM file(s) ignored")
    label = _orientation_label(np.asarray(stack.n))
    if label == "oblique":
        notes.append(
            "oblique slices stacked along their normal: read exactly, the orientation is in "
            "the direction matrix (no resampling)"
        )
    report = DicomReport(
        folder=str(folder),
        series_uid=chosen.uid,
        modality=modality,
        n_files=len(stack.files),
        choice=choice,
        transfer_syntaxes=sorted({_syntax_name(s) for s in syntax.values()}),
        size_xyz=tuple(int(x) for x in image.GetSize()),  # type: ignore[arg-type]
        resampled=not stack.regular,
        tilt_degrees=stack.tilt_degrees,
        warnings=warnings,
        notes=notes,
    )
    where = f"patient {patient!r}, " if patient else ""
    for w in warnings:
        log.warning("%sDICOM folder %s: %s", where, folder, w)
    if len(series) > 1:
        log.info("%sDICOM folder %s: %s", where, folder, choice)
    return DicomSeries(image, stack, report)
