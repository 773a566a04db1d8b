"""Header checks run before SimpleITK reads a file: single-file NIfTI-1 (truncated or
corrupt data, NaN/infinite voxels, NIfTI-2) and NRRD/MetaImage text headers (nonsense
sizes, values that hang or crash ITK's readers, voxel data shorter than promised).

Read by hand, not with SimpleITK's ``ReadImageInformation``: that runs the very ITK reader
that these headers hang or crash, so they are read before ITK sees them.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lymphdx.core.errors import InputError
from lymphdx.io.geometry import MAX_VOXELS, Geometry
from lymphdx.io.nifti_geometry import nifti_geometry

__all__ = ["check_nifti", "check_text_header", "nifti_pair_geometry"]


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
            sform makes it loop) or a huge allocation. (Voxel sizes and transforms are
            judged by :mod:`lymphdx.io.nifti_geometry`.)
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


def check_nifti(path: Path, patient: str | None) -> Geometry | None:
    """Refuse a truncated or corrupt NIfTI file, or one with NaN/infinite voxels; return
    where its voxels lie (:func:`lymphdx.io.nifti_geometry.nifti_geometry`: the NIfTI
    standard's choice of sform, qform or neither, which ITK's reader does not always make),
    or None for a file that is not a single-file NIfTI-1.

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
                return None  # not a single-file NIfTI-1: the reader will judge it
            geometry = nifti_geometry(header, path, patient)
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
    return geometry


_PAIR_SUFFIXES = (".hdr", ".hdr.gz", ".img", ".img.gz")


def nifti_pair_geometry(path: Path, patient: str | None) -> Geometry | None:
    """Where the voxels of a NIfTI-1 header/image pair lie (``.hdr`` + ``.img``, either
    named; see :mod:`lymphdx.io.nifti_geometry`), or None for an Analyze 7.5 pair or a
    missing header (the reader judges those).
    """
    name = path.name
    base = name[: -len(next(s for s in _PAIR_SUFFIXES if name.lower().endswith(s)))]
    for candidate in (path.parent / f"{base}.hdr", path.parent / f"{base}.hdr.gz"):
        if candidate.is_file():
            break
    else:
        return None
    try:
        with candidate.open("rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(candidate, "rb") as f:
            header = f.read(348)
    except (EOFError, OSError, zlib.error):
        return None  # the reader reports an unreadable header itself
    if header[344:347] != b"ni1":
        return None
    return nifti_geometry(header, candidate, patient)


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


def check_text_header(path: Path, patient: str | None) -> None:
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
