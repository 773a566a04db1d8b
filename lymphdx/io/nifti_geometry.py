"""Where a NIfTI-1 scan lies: its geometry decided from the header as the NIfTI-1 standard
(and nibabel's ``get_best_affine``) decides it, not as ITK's reader guesses it.

The standard gives three ways to place voxel ``(i, j, k)`` in the (RAS) world; the first
that the header declares wins:

1. the sform (``sform_code`` > 0): the matrix ``srow_x/y/z``; ``pixdim`` plays no part;
2. the qform (``qform_code`` > 0): rotation quaternion ``quatern_b/c/d``, voxel sizes
   ``pixdim[1:4]`` (positive), handedness ``qfac = pixdim[0]``, offsets ``qoffset_x/y/z``;
3. neither: nibabel's fallback, ``pixdim`` only (x flipped, centred on the volume).

ITK's NIfTI reader (SimpleITK 2.x, ITK 5.4) departs from this in ways that move or mirror
a scan without an error: a negative ``pixdim`` flips that axis even when the sform is
used (so ``pixdim[1] = -4`` with a valid sform reads mirrored left-right); it takes the
voxel size from ``pixdim`` even when the sform says otherwise (only a warning, "unexpected
scales in sform"); it uses the qform when both are set, differ, and ``sform_code`` is not
1; without either it puts the scan at the origin with the LPS axes (mirrored in y and
shifted against nibabel); and it scales voxel sizes, but not positions, by ``xyzt_units``.

So lymphdx reads the voxels with SimpleITK and sets the geometry computed here. Header
contradictions are corrected where the standard settles them and refused where readers
disagree and the header cannot tell which is meant:

- corrected (a warning): ``pixdim`` whose sign or size disagrees with the sform that is
  used (the standard ignores ``pixdim`` for the sform);
- refused: qform and sform both set but placing the voxels differently; a sform with shear
  or non-orthogonal axes (a SimpleITK direction cannot hold it); a negative, zero or NaN
  ``pixdim`` where the qform or the fallback needs it; a qform whose quaternion is not a
  rotation or whose ``qfac`` is not ±1; a transform code that is not a NIfTI code;
  positions in metres or micrometres.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lymphdx.core.errors import InputError
from lymphdx.io.geometry import Geometry

__all__ = ["NiftiTransforms", "nifti_geometry", "parse_transforms"]

log = logging.getLogger("lymphdx")

_CODE_NAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "Talairach", 4: "MNI", 5: "template"}
_UNITS = {1: "metres", 3: "micrometres"}  # xyzt_units & 7; 0 (unknown) and 2 (mm) are mm
_SHEAR_TOL = 1e-3  # largest |cos| between sform axes taken for float32 rounding
_AGREE_VOXELS = 0.1  # qform and sform may place a corner this many voxels apart
_QUATERNION_TOL = 1e-6  # b² + c² + d² may exceed 1 by this (float32 rounding)
_PIXDIM_RTOL = 1e-3  # pixdim agrees with the sform's voxel size within this (relative)


@dataclass(frozen=True)
class NiftiTransforms:
    """The fields of a NIfTI-1 header that place its voxels in the world."""

    shape: tuple[int, int, int]  # voxels along i, j, k (1 where the header has fewer dims)
    pixdim: tuple[float, float, float, float]  # pixdim[0] (qfac) .. pixdim[3]
    xyz_units: int  # xyzt_units & 7
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]  # quatern_b, c, d
    qoffset: tuple[float, float, float]
    srow: np.ndarray  # (3, 4): srow_x, srow_y, srow_z


def parse_transforms(header: bytes) -> NiftiTransforms | None:
    """The placing fields of a 348-byte NIfTI-1 header (either byte order), or None."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return None
    dim = struct.unpack(endian + "8h", header[40:56])
    ndim = max(0, min(dim[0], 7))
    shape = tuple(dim[i] if i <= ndim else 1 for i in (1, 2, 3))
    pixdim = struct.unpack(endian + "4f", header[76:92])
    (units,) = struct.unpack(endian + "B", header[123:124])
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    quatern = struct.unpack(endian + "6f", header[256:280])
    srow = np.array(struct.unpack(endian + "12f", header[280:328]), dtype=np.float64)
    return NiftiTransforms(
        shape=shape,  # type: ignore[arg-type]
        pixdim=pixdim,  # type: ignore[arg-type]
        xyz_units=units & 7,
        qform_code=qform_code,
        sform_code=sform_code,
        quatern=quatern[:3],  # type: ignore[arg-type]
        qoffset=quatern[3:],  # type: ignore[arg-type]
        srow=srow.reshape(3, 4),
    )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _code(name: str, code: int) -> str:
    return f"{name} {code} ({_CODE_NAMES.get(code, '?')})"


class _Judge:
    """Builds the refusals and warnings for one file, each naming the file and patient."""

    def __init__(self, path: Path | None, patient: str | None):
        self.path, self.patient = path, patient

    def refuse(self, problem: str, fix: str, corrupt: bool = False) -> InputError:
        kind = "corrupt NIfTI header" if corrupt else "contradictory NIfTI header"
        return InputError(f"{kind}: {problem}; {fix}", self.path, self.patient)

    def warn(self, problem: str) -> None:
        log.warning("%s", InputError(f"NIfTI header: {problem}", self.path, self.patient))


def _qform_affine(t: NiftiTransforms, used: bool, judge: _Judge) -> np.ndarray:
    """The qform's 4x4 RAS affine (NIfTI-1 method 2), refusing what readers disagree on.

    ``used``: the qform places the scan (no sform); else it is only compared with the
    sform, and a negative ``pixdim`` is taken by its size (as nibabel does).
    """
    b, c, d = (float(v) for v in t.quatern)
    norm2 = b * b + c * c + d * d
    if norm2 > 1.0 + _QUATERNION_TOL:
        raise judge.refuse(
            f"the qform quaternion (quatern_b, c, d) = {_fmt(t.quatern)} is longer than 1, so "
            "not a rotation (ITK rescales it silently, nibabel refuses it)",
            "write the file again with a valid qform, or set qform_code to 0 if the sform "
            "places the scan",
            corrupt=True,
        )
    sizes = np.asarray(t.pixdim[1:4], dtype=np.float64)
    if not np.all(np.isfinite(sizes) & (sizes != 0)):
        raise judge.refuse(
            f"the voxel size pixdim[1:4] = {_fmt(sizes)} is zero or not a number, and the "
            f"qform ({_code('qform_code', t.qform_code)}) needs it",
            "export the scan again with its voxel size",
            corrupt=True,
        )
    if used and np.any(sizes < 0):
        raise judge.refuse(
            f"pixdim[1:4] = {_fmt(sizes)} holds a negative voxel size and the scan is placed "
            f"by its qform ({_code('qform_code', t.qform_code)}, no sform): readers disagree "
            "on what that means (ITK mirrors the axis, nibabel ignores the sign, niftilib "
            "makes it 1 mm), so which side is left cannot be told",
            "export the scan again with positive voxel sizes (a flip belongs in the qform or "
            "sform), or give it an sform",
        )
    qfac = float(t.pixdim[0])
    if qfac not in (0.0, 1.0, -1.0):
        raise judge.refuse(
            f"qfac (pixdim[0]) is {qfac:g}, not 1 or -1, so the handedness of the qform "
            "cannot be told (ITK takes its sign, nibabel takes 1)",
            "set pixdim[0] to 1 or -1",
        )
    w = math.sqrt(max(0.0, 1.0 - norm2))
    if norm2 > 1.0:  # within rounding of a 180-degree rotation: normalise as niftilib does
        b, c, d = (v / math.sqrt(norm2) for v in (b, c, d))
    rotation = np.array(
        [
            [w * w + b * b - c * c - d * d, 2 * (b * c - w * d), 2 * (b * d + w * c)],
            [2 * (b * c + w * d), w * w + c * c - b * b - d * d, 2 * (c * d - w * b)],
            [2 * (b * d - w * c), 2 * (c * d + w * b), w * w + d * d - c * c - b * b],
        ]
    )
    scale = np.abs(sizes)
    scale[2] *= -1.0 if qfac < 0 else 1.0
    affine = np.eye(4)
    affine[:3, :3] = rotation * scale
    affine[:3, 3] = t.qoffset
    return affine


def _sform_affine(t: NiftiTransforms, judge: _Judge) -> np.ndarray:
    """The sform's 4x4 RAS affine (NIfTI-1 method 3), refusing one with shear."""
    matrix = t.srow[:, :3]
    sizes = np.linalg.norm(matrix, axis=0)
    if not np.all(sizes > 0):
        raise judge.refuse(
            f"the sform (srow_x, srow_y, srow_z) has a zero column: voxel axis "
            f"{'ijk'[int(np.argmin(sizes))]} has no length",
            "export the scan again with its geometry",
            corrupt=True,
        )
    axes = matrix / sizes
    cosines = np.abs(axes.T @ axes - np.eye(3))
    if cosines.max() > _SHEAR_TOL:
        i, j = np.unravel_index(np.argmax(cosines), cosines.shape)
        angle = math.degrees(math.acos(min(1.0, float(abs(axes[:, i] @ axes[:, j])))))
        raise judge.refuse(
            f"the sform ({_code('sform_code', t.sform_code)}) shears the grid: voxel axes "
            f"{'ijk'[i]} and {'ijk'[j]} meet at {angle:.2f} degrees, not 90 (gantry tilt or "
            "an affine registration); SimpleITK can only hold orthogonal axes",
            "resample the scan onto an orthogonal grid (dcm2niix corrects gantry tilt; "
            "lymphdx resamples tilt itself when given the DICOM series folder)",
        )
    affine = np.eye(4)
    affine[:3, :] = t.srow
    return affine


def _fallback_affine(t: NiftiTransforms, judge: _Judge) -> np.ndarray:
    """nibabel's affine for a header with neither form: ``pixdim`` only, x flipped,
    centred on the volume (``nibabel.affines.shape_zoom_affine``)."""
    sizes = np.asarray(t.pixdim[1:4], dtype=np.float64)
    if not np.all(np.isfinite(sizes) & (sizes != 0)):
        raise judge.refuse(
            f"the voxel size pixdim[1:4] = {_fmt(sizes)} is zero or not a number (and there "
            "is no qform or sform)",
            "export the scan again with its geometry",
            corrupt=True,
        )
    zooms = np.abs(sizes) * np.array([-1.0, 1.0, 1.0])
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -zooms * (np.asarray(t.shape, dtype=np.float64) - 1) / 2
    judge.warn(
        "neither qform nor sform is set (qform_code = sform_code = 0), so where the scan "
        "lies is unknown; it is placed as nibabel places it (voxel size from pixdim, centred "
        "on the volume), and the outputs carry that placement"
    )
    return affine


def _corners(shape: tuple[int, int, int]) -> np.ndarray:
    """(4, 8) homogeneous indices of the corner voxels of a grid of ``shape`` voxels."""
    edges = [(0, n - 1) for n in shape]
    points = np.array(np.meshgrid(*edges, indexing="ij")).reshape(3, -1)
    return np.vstack([points, np.ones(points.shape[1])])


def best_affine(
    t: NiftiTransforms, path: Path | None = None, patient: str | None = None
) -> np.ndarray:
    """The 4x4 RAS affine that places voxel ``(i, j, k, 1)``, chosen as the NIfTI-1 standard
    and nibabel's ``get_best_affine`` choose it, after the checks in the module docstring.

    Raises:
        InputError: a header contradiction that cannot be settled (names the fields).
    """
    judge = _Judge(path, patient)
    if t.xyz_units in _UNITS:
        unit = _UNITS[t.xyz_units]
        raise judge.refuse(
            f"xyzt_units says positions and voxel sizes are in {unit}; lymphdx reads "
            "millimetres (SimpleITK would rescale the voxel size but not the position)",
            f"convert the scan to millimetres, or set xyzt_units to 2 (mm) if its numbers "
            f"are already millimetres and '{unit}' is a mistake",
        )
    for name, code in (("qform_code", t.qform_code), ("sform_code", t.sform_code)):
        if code not in _CODE_NAMES:
            raise judge.refuse(
                f"{name} is {code}, not a NIfTI transform code (0 to 5); ITK uses that "
                "transform, nibabel ignores it",
                f"set {name} to 1 (scanner) if the transform is right, or to 0",
                corrupt=True,
            )
    sform = _sform_affine(t, judge) if t.sform_code > 0 else None
    qform = _qform_affine(t, sform is None, judge) if t.qform_code > 0 else None
    if sform is not None and qform is not None:
        corners = _corners(t.shape)
        apart = np.linalg.norm((sform - qform)[:3] @ corners, axis=0)
        tol = _AGREE_VOXELS * float(np.linalg.norm(sform[:3, :3], axis=0).min())
        if apart.max() > tol:
            worst = corners[:3, int(np.argmax(apart))].astype(int)
            raise judge.refuse(
                f"the qform ({_code('qform_code', t.qform_code)}) and the sform "
                f"({_code('sform_code', t.sform_code)}) place the scan differently: corner "
                f"voxel {tuple(worst.tolist())} lies {apart.max():.3g} mm apart (qform "
                f"{_fmt(qform[:3] @ corners[:, int(np.argmax(apart))])}, sform "
                f"{_fmt(sform[:3] @ corners[:, int(np.argmax(apart))])} mm RAS; the qform "
                f"takes its voxel sizes from pixdim[1:4] = {_fmt(t.pixdim[1:4])}), and "
                "readers differ in which they use (the NIfTI standard and nibabel: sform; "
                "ITK: the qform unless sform_code is 1)",
                "make them agree: set the qform from the sform (nibabel: "
                "img.set_qform(img.get_sform())) if the sform is right, or set sform_code to "
                "0 if the qform is",
            )
    if sform is None:
        return qform if qform is not None else _fallback_affine(t, judge)
    sizes = np.linalg.norm(sform[:3, :3], axis=0)
    pixdim = np.asarray(t.pixdim[1:4], dtype=np.float64)
    given = np.isfinite(pixdim) & (pixdim != 0)
    if np.any(pixdim[given] < 0) or not np.allclose(
        np.abs(pixdim[given]), sizes[given], rtol=_PIXDIM_RTOL
    ):
        judge.warn(
            f"pixdim[1:4] = {_fmt(pixdim)} disagrees with the voxel sizes of the sform "
            f"({_code('sform_code', t.sform_code)}), {_fmt(sizes)} mm; the sform is used, as "
            "the NIfTI standard says (ITK would take pixdim: a negative one mirrors that "
            "axis, a wrong one stretches it)"
        )
    return sform


def geometry_from_ras(affine: np.ndarray) -> Geometry:
    """The ``Geometry`` (LPS) of a 4x4 RAS affine with orthogonal axes.

    Direction cosines are the nearest rotation (SVD) to the normalised columns, which
    differ from it only by float32 rounding after ``best_affine``'s checks.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    matrix = lps[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    u, _, vt = np.linalg.svd(matrix / spacing)
    direction = u @ vt
    return Geometry(
        tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        tuple(float(o) for o in lps[:3, 3]),  # type: ignore[arg-type]
        tuple(float(v) for v in direction.ravel()),
    )


def nifti_geometry(
    header: bytes, path: Path | None = None, patient: str | None = None
) -> Geometry | None:
    """Where the voxels of a NIfTI-1 file with ``header`` lie (see the module docstring),
    or None if ``header`` is not a NIfTI-1 header.

    Raises:
        InputError: a header contradiction that cannot be settled (names the fields).
    """
    transforms = parse_transforms(header)
    if transforms is None:
        return None
    return geometry_from_ras(best_affine(transforms, path, patient))
