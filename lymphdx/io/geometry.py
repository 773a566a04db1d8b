"""Where a volume lies in the world: ``Geometry``, ``Volume``, ``MAX_VOXELS`` and ``to_sitk``.

Axis order (the one convention of lymphdx): arrays are ``(z, y, x)``, as
``SimpleITK.GetArrayFromImage`` returns them; ``Geometry`` holds spacing and origin in
ITK order ``(x, y, z)`` (mm, LPS world frame) and the direction cosines as a row-major
3×3 matrix whose *columns* are the world directions of the x, y and z index axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["Geometry", "MAX_VOXELS", "Volume", "to_sitk"]

#: Volumes with more voxels than this are refused before any reader allocates them: no CT
#: comes near it (512 x 512 x 2048 is 2^29), but a corrupt header easily promises more.
MAX_VOXELS = 2**31


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


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image from a ``(z, y, x)`` array and its geometry."""
    return geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(array)))
