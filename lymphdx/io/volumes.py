"""Volume I/O on SimpleITK: NIfTI, NRRD, MHA/MHD and DICOM series folders.

Axis order (the one convention of lymphdx): arrays are ``(z, y, x)``, as
``SimpleITK.GetArrayFromImage`` returns them; ``Geometry`` holds spacing and origin in
ITK order ``(x, y, z)`` (mm, LPS world frame) and the direction cosines as a row-major
3×3 matrix whose *columns* are the world directions of the x, y and z index axes.
Intensities come out in Hounsfield units: DICOM RescaleSlope/Intercept and NIfTI
``scl_slope``/``scl_inter`` are applied by SimpleITK's readers. DICOM series folders
go through :mod:`lymphdx.io.dicom` (slices sorted along their normal, gaps and gantry
tilt resampled with a warning, several series or non-CT refused).
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import re
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.core.files import atomic_path

__all__ = [
    "Geometry",
    "MAX_VOXELS",
    "SPACING_RANGE_MM",
    "Volume",
    "check_geometry",
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
    """Read the one DICOM series in ``folder`` (see :mod:`lymphdx.io.dicom`).

    Slices are sorted along their normal; gaps and gantry tilt are resampled with a
    warning; a folder with several series and non-CT series are refused.
    """
    from lymphdx.io.dicom import read_dicom_series

    return read_dicom_series(folder, patient).image


#: Volumes with more voxels than this are refused before any reader allocates them: no CT
#: comes near it (512 x 512 x 2048 is 2^29), but a corrupt header easily promises more.
MAX_VOXELS = 2**31


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a single-file NIfTI-1 keeps its voxels."""

    vox_offset: int
    nbytes: int  # voxel data bytes
    float_dtype: np.dtype | None  # set for float32/float64 data, else None


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes


def _nifti_layout(
    header: bytes, path: Path | None = None, patient: str | None = None
) -> _NiftiLayout | None:
    """The voxel layout a single-file NIfTI-1 header promises, or None if not one.

    Raises:
        InputError: header fields that ITK's reader would turn into a hang (an infinite
            sform makes it loop), a silently wrong spacing (it replaces a zero or NaN
            voxel size with 1 mm) or a huge allocation.
    """
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return None
    if header[344:347] != b"n+1":  # .hdr/.img pair or Analyze: not checked here
        return None
    dim = struct.unpack(endian + "8h", header[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
    if not 1 <= dim[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dim[1 : dim[0] + 1]):
        return None  # nonsense header: let the reader report it

    def corrupt(problem: str) -> InputError:
        return InputError(f"corrupt NIfTI header: {problem}; export the scan again", path, patient)

    (vox_offset,) = struct.unpack(endian + "f", header[108:112])
    if not math.isfinite(vox_offset) or vox_offset < 0:
        raise corrupt(f"vox_offset (where the voxels start) is {vox_offset}")
    pixdim = struct.unpack(endian + "8f", header[76:108])
    sizes = pixdim[1 : min(dim[0], 3) + 1]
    if not all(math.isfinite(p) and p != 0 for p in sizes):
        raise corrupt(f"voxel size pixdim[1:{len(sizes) + 1}] is {sizes}")
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    if qform_code > 0:
        quatern = struct.unpack(endian + "6f", header[256:280])
        if not all(math.isfinite(q) for q in quatern):
            raise corrupt(f"qform (quatern_b..qoffset_z) holds non-finite values {quatern}")
    if sform_code > 0:
        srow = struct.unpack(endian + "12f", header[280:328])
        if not all(math.isfinite(v) for v in srow):
            raise corrupt("sform (srow_x, srow_y, srow_z) holds non-finite values")
    voxels = 1
    for d in dim[1 : dim[0] + 1]:
        voxels *= d
    if voxels > MAX_VOXELS:
        raise corrupt(
            f"it promises {voxels} voxels ({' x '.join(map(str, dim[1 : dim[0] + 1]))}), "
            f"more than lymphdx reads ({MAX_VOXELS})"
        )
    code = _NIFTI_FLOATS.get(datatype)
    float_dtype = np.dtype(endian + code) if code and bitpix == 8 * int(code[1]) else None
    return _NiftiLayout(int(vox_offset), voxels * bitpix // 8, float_dtype)


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
            layout = _nifti_layout(header, path, patient)
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


# Bytes per voxel of the element types whose size is certain (MET_LONG is left out: its
# size follows the writer's platform).
_META_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8",
                     "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16",
                     "int16_t", "ushort", "unsigned short", "unsigned short int", "uint16",
                     "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int",
                     "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long",
                     "signed long long int", "int64", "int64_t", "ulonglong",
                     "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}  # fmt: skip
_TEXT_HEADER_MAX = 1 << 16  # a longer "header" is not one: leave the file to the reader


@dataclass(frozen=True)
class _TextHeader:
    """What a MetaImage or NRRD header says about its voxel data."""

    sizes: tuple[int, ...]
    element_bytes: int | None  # None: unknown type, sizes are still checked
    data: Path | None  # the file holding the voxels; None: not checkable (lists, skips)
    offset: int  # where the voxels start in ``data``
    compressed: bool  # zlib/gzip stream


def _header_fields(head: bytes) -> tuple[bool, dict[str, str], int] | None:
    """``(is NRRD, fields, header length)`` of a NRRD or MetaImage header, or None."""
    nrrd = head.startswith(b"NRRD")
    end = head.find(b"\n\n") if nrrd else -1
    if nrrd and end < 0 and len(head) < _TEXT_HEADER_MAX:
        end = len(head)  # a detached header (.nhdr) may end without a blank line
    if not nrrd:
        match = re.search(rb"^ElementDataFile *=[^\n]*(\n|$)", head, re.MULTILINE)
        end = match.end() if match else -1
    if end < 0:
        return None
    fields: dict[str, str] = {}
    for line in head[:end].decode("latin-1").splitlines()[(1 if nrrd else 0) :]:
        if nrrd and (line.startswith("#") or ":=" in line):
            continue  # comments and key/value pairs
        key, sep, value = line.partition(":" if nrrd else "=")
        if sep:
            fields[key.strip().lower() if nrrd else key.strip()] = value.strip()
    return nrrd, fields, end


# Header fields that hold geometry (positions, spacings, direction cosines), and the
# largest magnitude a sane value has (mm or cosine). ITK's MetaImage reader never returns
# on a TransformMatrix entry near the largest double, and its NRRD reader silently drops
# "space directions" with huge entries (reading the scan as 1 mm isotropic).
_GEOMETRY_FIELDS = {
    True: ("space directions", "space origin"),
    False: ("TransformMatrix", "Rotation", "Orientation", "Offset", "Position", "Origin",
            "ElementSpacing", "ElementSize", "CenterOfRotation"),
}  # fmt: skip
_GEOMETRY_LIMIT = 1e6
_NUMBER = re.compile(r"[-+]?(?:inf(?:inity)?|nan|(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)", re.I)


def _check_header_numbers(
    nrrd: bool, fields: dict[str, str], path: Path, patient: str | None
) -> None:
    """Refuse header values that make ITK's readers hang or crash, before they see them."""
    dims = fields.get("NDims", "3").strip()
    if not nrrd and not (dims.isdigit() and 2 <= int(dims) <= 4):
        # MetaIO crashes (segfault, heap corruption) on a negative or huge NDims.
        raise InputError(
            f"corrupt header: NDims is {dims!r}; a scan has 3 dimensions", path, patient
        )
    if nrrd:
        pattern = fields.get("data file", fields.get("datafile", "")).split()
    else:
        pattern = fields.get("ElementDataFile", "").split()
    if len(pattern) >= 4 and "%" in pattern[0]:
        # "FORMAT MIN MAX STEP": ITK's NRRD reader tries every name, however many; MetaIO
        # divides by STEP (a zero kills the process).
        try:
            first, last, step = (int(v) for v in pattern[1:4])
            count = (last - first) // step + 1 if step else 0
        except ValueError:
            count = 0
        slices = fields.get("sizes" if nrrd else "DimSize", "").split()[-1:]
        most = int(slices[0]) if slices and slices[0].isdigit() else 1
        if not 1 <= count <= most:
            raise InputError(
                f"corrupt header: data file pattern {' '.join(pattern[:4])!r} names "
                f"{count} files for a volume of {most} slices",
                path,
                patient,
            )
    for key in _GEOMETRY_FIELDS[nrrd]:
        for token in _NUMBER.findall(fields.get(key, "")):
            value = float(token)
            if not abs(value) <= _GEOMETRY_LIMIT:  # also catches NaN
                raise InputError(
                    f"corrupt header: {key} holds {token} (geometry values must be finite "
                    f"and within ±{_GEOMETRY_LIMIT:g})",
                    path,
                    patient,
                )


def _parse_text_header(
    path: Path, nrrd: bool, fields: dict[str, str], end: int
) -> _TextHeader | None:
    """What a NRRD or MetaImage header says about its voxel data, or None if unsure."""
    try:
        if nrrd:
            sizes = tuple(int(v) for v in fields["sizes"].split())
            element_bytes = _NRRD_TYPES.get(" ".join(fields.get("type", "").split()))
            encoding = fields.get("encoding", "raw").lower()
            name = fields.get("data file", fields.get("datafile"))
            skips = any(k in fields for k in ("line skip", "lineskip", "byte skip", "byteskip"))
            checkable = encoding in ("raw", "gzip", "gz") and not skips
            compressed = encoding in ("gzip", "gz")
            offset = end + 2
        else:
            sizes = tuple(int(v) for v in fields["DimSize"].split())
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            element_bytes = _META_TYPES.get(fields.get("ElementType", ""))
            if element_bytes is not None:
                element_bytes *= channels
            name = fields.get("ElementDataFile", "")
            name = None if name.upper() == "LOCAL" else name
            binary = fields.get("BinaryData", "True").lower() == "true"
            checkable = binary and "HeaderSize" not in fields and channels >= 1
            compressed = fields.get("CompressedData", "False").lower() == "true"
            offset = end
    except (KeyError, ValueError):
        return None  # a field the reader will complain about (or not need)
    if name is not None:
        listed = name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1
        checkable = checkable and not listed
        data, offset = path.parent / name, 0
    else:
        data = path
    return _TextHeader(sizes, element_bytes, data if checkable else None, offset, compressed)


def _stream_size(f, limit: int) -> int:
    """Bytes a zlib or gzip stream inflates to, counted up to ``limit``, in bounded memory."""
    inflate = zlib.decompressobj(wbits=47)  # 47: zlib or gzip header, detected
    total, pending = 0, b""
    while total < limit and not inflate.eof:
        if not pending:
            pending = f.read(1 << 20)
            if not pending:
                break
        total += len(inflate.decompress(pending, 1 << 22))
        pending = inflate.unconsumed_tail
    return total


def _check_text_header(path: Path, patient: str | None) -> None:
    """Refuse a MetaImage/NRRD header whose sizes are nonsense or promise more voxels than
    the file holds, before ITK allocates them: ITK allocates whatever a header says (a
    corrupt size can ask for terabytes) and its MetaImage reader silently accepts a
    compressed stream that ends early (the missing voxels are garbage)."""
    with path.open("rb") as f:
        head = f.read(_TEXT_HEADER_MAX)
    parsed = _header_fields(head)
    if parsed is None:
        return
    _check_header_numbers(parsed[0], parsed[1], path, patient)
    header = _parse_text_header(path, *parsed)
    if header is None:
        return
    shown = " x ".join(map(str, header.sizes))
    if not header.sizes or min(header.sizes) < 1:
        raise InputError(f"corrupt header: the volume size {shown} is not positive", path, patient)
    voxels = math.prod(header.sizes)
    if voxels > MAX_VOXELS:
        raise InputError(
            f"corrupt header: it promises {voxels} voxels ({shown}), more than lymphdx "
            f"reads ({MAX_VOXELS})",
            path,
            patient,
        )
    if header.element_bytes is None or header.data is None or not header.data.is_file():
        return  # the reader reports a missing data file itself
    expected = voxels * header.element_bytes
    if header.compressed:
        try:
            with header.data.open("rb") as f:
                f.seek(header.offset)
                available = _stream_size(f, expected)
        except zlib.error as err:
            where = "" if header.data == path else f" in {str(header.data)!r}"
            raise InputError(
                f"corrupt compressed voxel data{where} ({err}); copy or export it again",
                path,
                patient,
            ) from None
    else:
        available = header.data.stat().st_size - header.offset
    if available < expected:
        where = "the file" if header.data == path else f"its data file {str(header.data)!r}"
        raise InputError(
            f"truncated: the header promises {expected} bytes of voxel data ({shown} voxels) "
            f"but {where} holds {max(available, 0)}; copy or export it again",
            path,
            patient,
        )


def read_image(path: str | Path, patient: str | None = None) -> sitk.Image:
    """Read a volume file or a DICOM series folder as a SimpleITK image.

    Raises:
        InputError: missing, unreadable or corrupt input (names file and patient).
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # a dangling link or a loop of links, not a missing file
            try:
                path.resolve(strict=True)
                why = "is a symbolic link whose target does not exist"
            except RuntimeError:
                why = "is a loop of symbolic links"
            except OSError as err:
                why = (
                    "is a loop of symbolic links"
                    if err.errno == errno.ELOOP
                    else f"is a symbolic link whose target does not exist ({err.strerror})"
                )
            raise InputError(why, path, patient)
        raise InputError("file does not exist", path, patient)
    try:
        if path.is_dir():
            return _read_dicom_folder(path, patient)
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
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti(path, patient)
        elif name.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
            _check_text_header(path, patient)
        return sitk.ReadImage(str(path))
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
