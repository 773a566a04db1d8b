"""DICOM series reading that survives real exports.

pydicom reads the headers (no pixels) to group, choose, sort and check the slices;
SimpleITK/GDCM decodes the pixels one file at a time (pydicom's installed decoders are
the fallback), each slice with its own RescaleSlope/Intercept, so values are in HU.
The headers are read and a series chosen in :mod:`lymphdx.io.dicom_headers`, the slices
sorted and checked in :mod:`lymphdx.io.dicom_stack`; this module decodes the pixels and
puts the series together.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.io.dicom_headers import choose_series, image_series, orientation_label, syntax_name
from lymphdx.io.dicom_stack import SliceStack, build_stack
from lymphdx.io.geometry import MAX_VOXELS, Geometry, to_sitk

__all__ = ["DicomReport", "DicomSeries", "read_dicom_series"]

log = logging.getLogger("lymphdx")


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
            f"cannot decode the pixel data (transfer syntax {syntax_name(syntax)}): neither "
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
    series, others = image_series(folder, patient)
    chosen, choice = choose_series(series, folder, patient, series_uid, pick_largest)
    modality = chosen.modality
    if modality != "CT" and not allow_non_ct:
        raise InputError(
            f"series {chosen.uid} is {modality or 'of no stated modality'}, not CT; the "
            "models are for CT: give a CT series",
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
    label = orientation_label(np.asarray(stack.n))
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
        transfer_syntaxes=sorted({syntax_name(s) for s in syntax.values()}),
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
