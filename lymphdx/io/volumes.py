"""Volume I/O on SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders.

Arrays are ``(z, y, x)`` with a ``Geometry`` (the axis convention is set out in
:mod:`lymphdx.io.geometry`); a file's header is checked (:mod:`lymphdx.io.headers`)
before SimpleITK reads it. Intensities come out in Hounsfield units: DICOM
RescaleSlope/Intercept and NIfTI ``scl_slope``/``scl_inter`` are applied by SimpleITK's
readers. A NIfTI-1 file (or ``.hdr``/``.img`` pair) is placed by the geometry its header
gives under the NIfTI standard (:mod:`lymphdx.io.nifti_geometry`: sform, else qform, else
pixdim only, as nibabel does), not by ITK's reading of it. DICOM series folders go through
:mod:`lymphdx.io.dicom` (slices sorted along their normal, gaps and gantry tilt resampled
with a warning, several series or non-CT refused).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.core.files import atomic_path, path_problem
from lymphdx.io.dicom import read_dicom_series
from lymphdx.io.geometry import Geometry, Volume, to_sitk
from lymphdx.io.headers import check_nifti, check_text_header, nifti_pair_geometry

__all__ = [
    "SPACING_RANGE_MM",
    "check_geometry",
    "dicom_series_ids",
    "read_image",
    "read_volume",
    "read_mask",
    "write_volume",
]


def dicom_series_ids(folder: str | Path) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series in ``folder`` (not recursive)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _read_dicom_folder(folder: Path, patient: str | None, series_uid: str | None) -> sitk.Image:
    """Read the one DICOM series in ``folder``, or the one ``series_uid`` names (see
    :mod:`lymphdx.io.dicom`).

    Slices are sorted along their normal; gaps and gantry tilt are resampled with a
    warning; a folder with several series (without ``series_uid``) and non-CT series are
    refused.
    """
    return read_dicom_series(folder, patient, series_uid=series_uid).image


def read_image(
    path: str | Path, patient: str | None = None, series_uid: str | None = None
) -> sitk.Image:
    """Read a volume file or a DICOM series folder as a SimpleITK image; ``series_uid``
    picks the series of a DICOM folder that holds several (files ignore it).

    Raises:
        InputError: missing, unreadable or corrupt input (names file and patient).
    """
    path = Path(path)
    problem = path_problem(path)  # missing, a dangling link or a loop of links
    if problem is not None:
        raise InputError(problem, path, patient)
    try:
        if path.is_dir():
            return _read_dicom_folder(path, patient, series_uid)
        with path.open("rb") as f:  # unreadable (permissions, a broken mount): say so
            magic = f.read(2)
    except OSError as err:
        raise InputError(f"cannot open: {err.strerror or err}", path, patient) from None
    try:
        name = path.name.lower()
        if magic == b"\x1f\x8b" and not name.endswith((".gz", ".nii.gz")):
            raise InputError(
                "is gzip-compressed but its name does not end in .gz: rename it "
                f"(e.g. {path.name}.gz, or .nii.gz for NIfTI) so that it can be read",
                path,
                patient,
            )
        geometry = None
        if name.endswith((".nii", ".nii.gz")):
            geometry = check_nifti(path, patient)
        elif name.endswith((".hdr", ".hdr.gz", ".img", ".img.gz")):
            geometry = nifti_pair_geometry(path, patient)
        elif name.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
            check_text_header(path, patient)
        if geometry is None:
            return sitk.ReadImage(str(path))
        return _read_nifti(path, geometry)
    except InputError:
        raise
    except MemoryError:
        raise InputError("too large to read into memory", path, patient) from None
    except RuntimeError as err:  # SimpleITK/ITK reader errors
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), "")
        detail = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\): |sitk::ERROR: )", "", detail.strip())
        suffix = f": {detail[:200]}" if detail else ""
        raise InputError(
            f"cannot read as a medical image (corrupt or unsupported format){suffix}",
            path,
            patient,
        ) from None


def _read_nifti(path: Path, geometry: Geometry) -> sitk.Image:
    """The voxels of a NIfTI-1 file as SimpleITK reads them, placed by ``geometry`` (the
    header's own, :mod:`lymphdx.io.nifti_geometry`) rather than by ITK's guess.

    ITK's warnings about the transforms ("unexpected scales in sform") are silenced for
    this read: the header was judged already, and any contradiction was reported then.
    """
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = sitk.ReadImage(str(path))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if image.GetDimension() == 3:  # other sizes are refused by the callers
        geometry.apply(image)
    return image


def _check_3d(image: sitk.Image, path: Path, patient: str | None) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected a scalar 3-D volume",
            path,
            patient,
        )
    if image.GetDimension() != 3:
        raise InputError(
            f"image is {image.GetDimension()}-D (size {image.GetSize()}); expected a 3-D volume",
            path,
            patient,
        )
    if min(image.GetSize()) < 1:
        raise InputError(f"image has size {image.GetSize()} (x, y, z): no voxels", path, patient)
    if min(image.GetSize()) < 2:
        raise InputError(
            f"image has size {image.GetSize()} (x, y, z): a single slice, not a 3-D volume",
            path,
            patient,
        )
    check_geometry(Geometry.of(image), path, patient)


#: Voxel sizes outside this range (mm) are taken for a corrupt header or a unit mix-up.
SPACING_RANGE_MM = (1e-3, 1e3)
_ORIGIN_LIMIT_MM = 1e6  # a kilometre from the scanner's origin is not a patient
_ORTHONORMAL_TOL = 1e-2


def check_geometry(
    geometry: Geometry, path: str | Path | None = None, patient: str | None = None
) -> None:
    """Refuse a geometry no scan has: non-finite or non-positive spacing, spacing outside
    ``SPACING_RANGE_MM``, a non-finite or absurd origin, or direction cosines that are not
    orthonormal (a rotation, possibly with a reflection).

    Readers hand such values through without complaint (NaN spacing, a zero column in a
    MetaImage ``TransformMatrix``), and resampling them gives garbage or NaN.

    Raises:
        InputError: naming the file, the patient and the offending values.
    """
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    origin = np.asarray(geometry.origin, dtype=np.float64)
    direction = np.asarray(geometry.direction, dtype=np.float64)
    lo, hi = SPACING_RANGE_MM
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise InputError(
            f"voxel spacing {geometry.spacing} (x, y, z) is not three positive finite "
            "numbers; the header is corrupt",
            path,
            patient,
        )
    if spacing.min() < lo or spacing.max() > hi:
        raise InputError(
            f"voxel spacing {geometry.spacing} (x, y, z) is outside {lo:g}..{hi:g} mm: a "
            "corrupt header, or a unit other than millimetres",
            path,
            patient,
        )
    if origin.shape != (3,) or not np.isfinite(origin).all():
        raise InputError(
            f"origin {geometry.origin} is not three finite numbers; the header is corrupt",
            path,
            patient,
        )
    if np.abs(origin).max() > _ORIGIN_LIMIT_MM:
        raise InputError(
            f"origin {geometry.origin} lies more than {_ORIGIN_LIMIT_MM:g} mm from the "
            "scanner's origin; the header is corrupt",
            path,
            patient,
        )
    matrix = direction.reshape(3, 3) if direction.size == 9 else None
    finite = matrix is not None and bool(np.isfinite(matrix).all())
    if not finite or np.abs(np.clip(matrix, -2, 2)).max() > 1 + _ORTHONORMAL_TOL:
        orthonormal = False  # an entry of a rotation matrix lies in [-1, 1]
    else:
        orthonormal = np.abs(matrix.T @ matrix - np.eye(3)).max() <= _ORTHONORMAL_TOL
    if not orthonormal:
        raise InputError(
            f"direction cosines {geometry.direction} are not an orthonormal 3x3 matrix "
            "(a rotation); the header is corrupt",
            path,
            patient,
        )


def _squeeze_4d(image: sitk.Image) -> sitk.Image:
    """A 4-D image with a single time point is a 3-D volume written by some tools."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, 0])
    return image


def read_volume(
    path: str | Path, patient: str | None = None, series_uid: str | None = None
) -> Volume:
    """Read a 3-D scan into a float32 ``(z, y, x)`` array in HU plus its geometry
    (``series_uid``: which series of a DICOM folder, ``read_image``).

    Raises:
        InputError: missing/corrupt file, not 3-D, or NaN/infinite voxels.
    """
    path = Path(path)
    image = _squeeze_4d(read_image(path, patient, series_uid))
    _check_3d(image, path, patient)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{bad} voxels are NaN or infinite", path, patient)
    return Volume(array, Geometry.of(image))


def read_mask(
    path: str | Path, reference: Geometry, shape_zyx: tuple[int, ...], patient: str | None = None
) -> Volume:
    """Read an ROI mask on the grid of its image and binarise it (nonzero = node).

    Instance ids (one integer per node) are allowed; they become 1.

    Raises:
        InputError: unreadable mask, a size/geometry that differs from the image, or
            values that are not labels (NaN, fractions, negative numbers).
    """
    path = Path(path)
    image = _squeeze_4d(read_image(path, patient))
    _check_3d(image, path, patient)
    size_xyz = tuple(reversed(shape_zyx))
    if tuple(image.GetSize()) != size_xyz:
        raise InputError(
            f"mask size {image.GetSize()} (x, y, z) differs from its image's {size_xyz}",
            path,
            patient,
        )
    geometry = Geometry.of(image)
    if not geometry.close_to(reference):
        raise InputError(
            "mask geometry differs from its image's: "
            f"mask spacing {geometry.spacing}, origin {geometry.origin}, direction "
            f"{geometry.direction}; image spacing {reference.spacing}, origin "
            f"{reference.origin}, direction {reference.direction}",
            path,
            patient,
        )
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        bad = array[~np.isfinite(array)]
        if bad.size:
            raise InputError(f"{bad.size} mask voxels are NaN or infinite", path, patient)
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise InputError(
                f"mask holds non-integer values (e.g. {float(fractional[0]):g}): expected 0 "
                "for background and 1 (or integer node ids) for lymph nodes, not "
                "probabilities; threshold it first",
                path,
                patient,
            )
    if array.dtype.kind in "fi" and array.size and array.min() < 0:
        raise InputError(
            f"mask holds negative values (e.g. {array.min():g}): expected 0 for background "
            "and 1 (or positive node ids) for lymph nodes",
            path,
            patient,
        )
    return Volume((array != 0).astype(np.uint8), reference)


def write_volume(path: str | Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a ``(z, y, x)`` array with its geometry; format chosen by extension.

    Written to a temporary name and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    image = to_sitk(array, geometry)
    if path.name.lower().endswith(_DETACHED_HEADER_SUFFIXES):
        _write_detached(path, image)
        return path
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


_DETACHED_HEADER_SUFFIXES = (".mhd", ".nhdr")


def _write_detached(path: Path, image: sitk.Image) -> None:
    """Write a header + data-file pair (``.mhd``/``.nhdr``) without exposing half of it.

    The header names its data file, so both are written under their final names in a
    temporary folder beside ``path``; then the data file is moved into place, and the
    header last, so a reader never finds a header whose data file is missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        sitk.WriteImage(image, str(tmpdir / path.name), useCompression=True)
        for written in sorted(tmpdir.iterdir()):
            if written.name != path.name:
                os.replace(written, path.parent / written.name)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
