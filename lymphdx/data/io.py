"""Volume I/O on SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders.

Axis order (the one convention of lymphdx): arrays are ``(z, y, x)``, as
``SimpleITK.GetArrayFromImage`` returns them; ``Geometry`` holds spacing and origin in
ITK order ``(x, y, z)`` (mm, LPS world frame) and the direction cosines as a row-major
3×3 matrix whose *columns* are the world directions of the x, y and z index axes.
Intensities come out in Hounsfield units: DICOM RescaleSlope/Intercept and NIfTI
``scl_slope``/``scl_inter`` are applied by SimpleITK's readers. DICOM series folders
go through :mod:`lymphdx.data.dicom` (slices sorted along their normal, gaps and gantry
tilt resampled with a warning, several series or non-CT refused).
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lymphdx.errors import InputError
from lymphdx.fileutil import atomic_path

__all__ = [
    "Geometry",
    "Volume",
    "dicom_series_ids",
    "read_image",
    "read_volume",
    "read_mask",
    "write_volume",
    "to_sitk",
    "VOLUME_SUFFIXES",
]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Where a ``(z, y, x)`` array lies in the world.

    Attributes:
        spacing: voxel size ``(x, y, z)`` in mm.
        origin: world position (LPS, mm) of voxel ``(0, 0, 0)``.
        direction: row-major 3×3 direction-cosine matrix (9 floats).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """Geometry of a 3-D SimpleITK image."""
        return cls(
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def affine_lps(self) -> np.ndarray:
        """4×4 matrix mapping ``(x, y, z, 1)`` voxel indices to LPS world mm."""
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """4×4 matrix to RAS world mm: what nibabel reports as a NIfTI's affine."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()

    def close_to(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when spacing, origin and direction agree within ``tol`` (relative for mm)."""
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        return bool(
            np.allclose(self.spacing, other.spacing, atol=tol * scale)
            and np.allclose(self.origin, other.origin, atol=tol * 10 * scale)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass
class Volume:
    """A ``(z, y, x)`` float32 array in HU (or a mask) with its geometry."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return (x, y, z)


def dicom_series_ids(folder: str | Path) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series in ``folder`` (not recursive)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def _read_dicom_folder(folder: Path, patient: str | None) -> sitk.Image:
    """Read the one DICOM series in ``folder`` (see :mod:`lymphdx.data.dicom`).

    Slices are sorted along their normal; gaps and gantry tilt are resampled with a
    warning; a folder with several series and non-CT series are refused.
    """
    from lymphdx.data.dicom import read_dicom_series

    return read_dicom_series(folder, patient).image


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a single-file NIfTI-1 keeps its voxels."""

    vox_offset: int
    nbytes: int  # voxel data bytes
    float_dtype: np.dtype | None  # set for float32/float64 data, else None


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The voxel layout a single-file NIfTI-1 header promises, or None if not one."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return None
    if header[344:347] != b"n+1":  # .hdr/.img pair or Analyze: not checked here
        return None
    dim = struct.unpack(endian + "8h", header[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
    vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
    if not 1 <= dim[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dim[1 : dim[0] + 1]):
        return None  # nonsense header: let the reader report it
    voxels = 1
    for d in dim[1 : dim[0] + 1]:
        voxels *= d
    code = _NIFTI_FLOATS.get(datatype)
    float_dtype = np.dtype(endian + code) if code and bitpix == 8 * int(code[1]) else None
    return _NiftiLayout(vox_offset, voxels * bitpix // 8, float_dtype)


def _is_nifti2(header: bytes) -> bool:
    return (
        len(header) >= 8
        and header[4:7] == b"n+2"
        and header[:4] in (struct.pack("<i", 540), struct.pack(">i", 540))
    )


def _check_nifti(path: Path, patient: str | None) -> None:
    """Refuse a truncated or corrupt NIfTI file, or one with NaN/infinite voxels.

    ITK's NIfTI reader silently accepts a file that ends early (the missing voxels come
    back as garbage) and silently turns NaN/inf voxels into 0, so both are checked here
    in one streaming pass: a gzip stream is decompressed to its end (which verifies its
    CRC), its length compared with what the header promises, and float voxels scanned.
    """
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    nonfinite = 0
    try:
        with opener(path, "rb") as f:
            header = f.read(348)
            if _is_nifti2(header):
                raise InputError(
                    "NIfTI-2 files are not supported by the reader (SimpleITK); "
                    "save the scan as NIfTI-1 (.nii.gz), NRRD or MHA",
                    path,
                    patient,
                )
            layout = _nifti_layout(header)
            if layout is None:
                return  # not a single-file NIfTI-1: the reader will judge it
            if layout.float_dtype is None and not gzipped:
                total = path.stat().st_size
            else:
                total, pending = len(header), b""
                data_end = layout.vox_offset + layout.nbytes
                while chunk := f.read(1 << 22):
                    start, total = total, total + len(chunk)
                    if layout.float_dtype is None:
                        continue
                    lo, hi = max(layout.vox_offset - start, 0), min(data_end - start, len(chunk))
                    if lo >= hi:
                        continue
                    pending += chunk[lo:hi]
                    whole = len(pending) - len(pending) % layout.float_dtype.itemsize
                    values = np.frombuffer(pending[:whole], layout.float_dtype)
                    nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                    pending = pending[whole:]
    except (EOFError, OSError, zlib.error) as err:
        raise InputError(
            f"corrupt or truncated gzip data ({err}); the file is incomplete, "
            "copy or export it again",
            path,
            patient,
        ) from None
    expected = layout.vox_offset + layout.nbytes
    if total < expected:
        raise InputError(
            f"truncated NIfTI file: holds {total} bytes but its header needs "
            f"{expected}; copy or export it again",
            path,
            patient,
        )
    if nonfinite:
        raise InputError(f"{nonfinite} voxels are NaN or infinite", path, patient)


def read_image(path: str | Path, patient: str | None = None) -> sitk.Image:
    """Read a volume file or a DICOM series folder as a SimpleITK image.

    Raises:
        InputError: missing, unreadable or corrupt input (names file and patient).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path, patient)
    try:
        if path.is_dir():
            return _read_dicom_folder(path, patient)
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti(path, patient)
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as err:  # SimpleITK/ITK reader errors
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), "")
        suffix = f": {detail[:200]}" if detail else ""
        raise InputError(
            f"cannot read as a medical image (corrupt or unsupported format){suffix}",
            path,
            patient,
        ) from None


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
    if min(image.GetSize()) < 2:
        raise InputError(
            f"image has size {image.GetSize()} (x, y, z): a single slice, not a 3-D volume",
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


def read_volume(path: str | Path, patient: str | None = None) -> Volume:
    """Read a 3-D scan into a float32 ``(z, y, x)`` array in HU plus its geometry.

    Raises:
        InputError: missing/corrupt file, not 3-D, or NaN/infinite voxels.
    """
    path = Path(path)
    image = _squeeze_4d(read_image(path, patient))
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
        InputError: unreadable mask, or a size/geometry that differs from the image.
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
    return Volume((array != 0).astype(np.uint8), reference)


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a ``(z, y, x)`` array and its geometry."""
    return geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(array)))


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
