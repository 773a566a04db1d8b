"""Volume I/O on SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders.

Axis order (the one convention of lymphdx): arrays are ``(z, y, x)``, as
``SimpleITK.GetArrayFromImage`` returns them; ``Geometry`` holds spacing and origin in
ITK order ``(x, y, z)`` (mm, LPS world frame) and the direction cosines as a row-major
3×3 matrix whose *columns* are the world directions of the x, y and z index axes.
Intensities come out in Hounsfield units: DICOM RescaleSlope/Intercept and NIfTI
``scl_slope``/``scl_inter`` are applied by SimpleITK's readers.
"""

from __future__ import annotations

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
    ids = dicom_series_ids(folder)
    if not ids:
        raise InputError("folder holds no DICOM series", folder, patient)
    if len(ids) > 1:
        listing = ", ".join(ids)
        raise InputError(
            f"folder holds {len(ids)} DICOM series ({listing}); give a folder with exactly one",
            folder,
            patient,
        )
    # GDCM orders the slices by their position along the slice normal.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # keeps RescaleSlope/Intercept exact
    return reader.Execute()


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
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as err:  # SimpleITK/ITK reader errors
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), "")
        raise InputError(
            f"cannot read as a medical image (corrupt or unsupported format){': ' + detail[:200] if detail else ''}",
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
    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk(array, geometry), str(tmp), useCompression=True)
    return path
