"""Fuzzing the readers: manifests, volume geometry and mutated volume files.

Every input either works or ends in a :class:`~lymphdx.core.errors.LymphdxError` that names
the file; never another exception, a crash (segfault) or a hang.

(a) manifests and (b) geometry are hypothesis property tests: random CSV text; spacing,
origin, direction and size combinations, checked directly and read from a MetaImage
header. (c) is a deterministic mutation fuzz of ``read_volume``: for each format a small
valid file (or DICOM series) is mutated with seeded bit flips, truncations, inserted
garbage, tampered header fields and header lines known to have crashed ITK; each mutant
is read in a worker process watched by a per-read timeout, so that a segfault or a hang
in SimpleITK/GDCM is reported with the mutant that reproduces it (``python -m
tests.test_fuzz FORMAT INDEX`` writes that mutant and reads it in-process).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import selectors
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lymphdx.core.config import DataConfig
from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.data.grid import canonical_grid, check_coverage
from lymphdx.data.manifest import (
    SPLITS,
    load_strong_manifest,
    load_weak_manifest,
)
from lymphdx.data.splits import read_splits_csv
from lymphdx.io.geometry import Geometry, to_sitk
from lymphdx.io.volumes import (
    SPACING_RANGE_MM,
    check_geometry,
    read_volume,
    write_volume,
)
from tests.helpers import OBLIQUE_DIRECTION, make_dicom_series

REPO = Path(__file__).resolve().parents[1]
_FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# --------------------------------------------------------------------------- (a) manifests

_IMAGES = [f"img{i}.nii.gz" for i in range(10)] + ["sub/d.nii.gz"]  # exist (empty files)


def _mostly(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` nine times in ten, else ``odd``."""
    return st.integers(0, 9).flatmap(lambda k: odd if k == 0 else valid)


_CELLS = {
    "patient_id": _mostly(
        st.integers(0, 30).map(lambda k: f"P{k}") | st.sampled_from(["Pé", "患者1", " P7 "]),
        st.sampled_from(["", " ", "P1", "p1", "P 4", "\t"]) | st.text(max_size=6),
    ),
    "image": _mostly(
        st.sampled_from([*_IMAGES, " img3.nii.gz ", "./img4.nii.gz"]),
        st.sampled_from(["missing.nii.gz", "", "/nonexistent/x.nii", "sub", "img1.nii.gz"]),
    ),
    "mask": _mostly(st.sampled_from(_IMAGES), st.sampled_from(["missing_mask.nii.gz", "", "sub"])),
    "label": _mostly(
        st.sampled_from(["0", "1", "1.0", "0.0", " 1 ", "1e0"]),
        st.sampled_from(["2", "-1", "nan", "inf", "", "yes", "0x1", "½", "0.5"]),
    ),
    "split": _mostly(
        st.sampled_from(["train", "val", "test", "TRAIN", " Val "]),
        st.sampled_from(["", "dev", "tëst"]),
    ),
}
_HEADER_NAMES = ["patient_id", "image", "label", "split", "mask", "extra", "Patient_ID", " image "]


@st.composite
def manifest_bytes(draw, kind: str) -> tuple[bytes, list[list[str]] | None]:
    """CSV bytes of a (often broken) manifest, and its rows when written by csv.writer."""
    import csv
    import io

    required = ["patient_id", "image"] + (["label"] if kind == "weak" else ["mask"])
    if draw(st.integers(0, 9)):
        extra = draw(st.sampled_from([[], [], ["split"], ["split", "extra"], ["extra"]]))
        header = draw(st.permutations(required + extra))
        header = [draw(_mostly(st.just(h), st.just(f" {h.upper()} "))) for h in header]
    else:
        header = draw(st.lists(st.sampled_from(_HEADER_NAMES), max_size=5))
    rows = []
    for _ in range(draw(st.integers(0, 5))):
        row = [draw(_CELLS.get(h.strip().lower(), st.text(max_size=4))) for h in header]
        if draw(st.integers(0, 19)) == 0:  # a ragged row
            row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(st.text(max_size=3)))
        rows.append(row)
    if draw(st.integers(0, 3)):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(
            [header, *rows]
        )
        text, written = buffer.getvalue(), rows
    else:  # joined by hand: stray quotes and commas break the structure
        text, written = "\n".join(",".join(r) for r in [header, *rows]), None
        if draw(st.booleans()):
            text = text.replace("\n", "\n\n", 1)  # blank lines are ignored
    data = ("\ufeff" if draw(st.booleans()) else "").encode() + text.encode("utf-8")
    if draw(st.integers(0, 29)) == 0:
        data += b"\xff\xfe not utf-8"
    return data, written


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("manifests")
    for name in _IMAGES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


def _check_records(records, path: Path, kind: str, written: list[list[str]] | None) -> None:
    """What every accepted manifest satisfies."""
    assert records, "an accepted manifest has patients"
    ids = [r.patient_id for r in records]
    assert all(pid and pid == pid.strip() for pid in ids), ids
    assert len(set(ids)) == len(ids), ids
    splits = {r.split for r in records}
    assert splits <= set(SPLITS) or splits == {None}, splits
    images = [r.image.resolve() for r in records]
    assert len(set(images)) == len(images), "two patients share a scan"
    for r in records:
        assert r.image.is_absolute() and r.image.exists(), r.image
        assert r.manifest == path
        if kind == "weak":
            assert r.label in (0, 1) and isinstance(r.label, int), r.label
        else:
            assert r.mask.is_absolute() and r.mask.exists(), r.mask
    if written is not None:  # every non-blank row became a record, in order
        expected = [row for row in written if any(c.strip() for c in row)]
        assert len(records) == len(expected), (records, written)


@settings(max_examples=250, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(case=manifest_bytes("weak"))
def test_weak_manifest_parses_or_says_why(manifest_dir, case):
    data, written = case
    path = manifest_dir / "weak.csv"
    path.write_bytes(data)
    try:
        records = load_weak_manifest(path)
    except InputError as err:
        assert str(path) in str(err), str(err)
        event("refused")
        return
    event("accepted")
    _check_records(records, path, "weak", written)


@settings(max_examples=120, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(case=manifest_bytes("strong"))
def test_strong_manifest_parses_or_says_why(manifest_dir, case):
    data, written = case
    path = manifest_dir / "strong.csv"
    path.write_bytes(data)
    try:
        records = load_strong_manifest(path)
    except InputError as err:
        assert str(path) in str(err), str(err)
        event("refused")
        return
    event("accepted")
    _check_records(records, path, "strong", written)


@settings(max_examples=120, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(
    text=st.lists(
        st.tuples(
            _mostly(st.sampled_from(["weak", "strong", "Weak"]), st.text(max_size=3)),
            _CELLS["patient_id"],
            _CELLS["split"],
            _mostly(st.sampled_from(["0", "1", ""]), _CELLS["label"]),
        ).map(list),
        max_size=6,
    ).map(
        lambda rows: "\n".join(
            ",".join(r) for r in [["set", "patient_id", "split", "label"], *rows]
        )
    )
)
def test_splits_file_parses_or_says_why(manifest_dir, text):
    path = manifest_dir / "splits.csv"
    path.write_text(text, encoding="utf-8")
    try:
        saved = read_splits_csv(path)
    except InputError as err:
        assert str(path) in str(err), str(err)
        event("refused")
        return
    event("accepted")
    for (set_name, pid), entry in saved.items():
        assert set_name in ("weak", "strong") and pid and entry.split in SPLITS
        assert entry.label in (0, 1, None)


# --------------------------------------------------------------------------- (b) geometry

_ODD_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1.0, 0.5, 1.0, 2.5, 1e-4, 999.0, 1e4]),
)
_NICE_FLOATS = st.floats(0.2, 6.0)
_SPACING = _mostly(_NICE_FLOATS, _ODD_FLOATS)
_ORIGIN = _mostly(st.floats(-500, 500), _ODD_FLOATS)


@st.composite
def directions(draw) -> tuple[float, ...]:
    """A rotation (maybe with a reflection), a slightly or badly perturbed one, or junk."""
    kind = draw(st.sampled_from(["rotation"] * 4 + ["perturbed", "junk", "permutation"] * 2))
    if kind == "junk":
        return tuple(draw(st.lists(_ODD_FLOATS, min_size=9, max_size=9)))
    if kind == "permutation":
        order = draw(st.permutations([0, 1, 2]))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        matrix = np.zeros((3, 3))
        for col, (row, sign) in enumerate(zip(order, signs, strict=True)):
            matrix[row, col] = sign
        return tuple(matrix.ravel())
    q = np.array(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4)))
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0, 0, 0])
    w, x, y, z = q / np.linalg.norm(q)
    matrix = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    if draw(st.booleans()):
        matrix[:, 2] *= -1  # a reflection: left-handed, still orthonormal
    if kind == "perturbed":
        matrix = matrix + draw(st.sampled_from([1e-6, 1e-3, 0.05, 0.5])) * np.asarray(
            draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))
        ).reshape(3, 3)
    return tuple(float(v) for v in matrix.ravel())


@settings(max_examples=300, deadline=None)
@given(
    spacing=st.tuples(_SPACING, _SPACING, _SPACING),
    origin=st.tuples(_ORIGIN, _ORIGIN, _ORIGIN),
    direction=directions(),
    size=st.tuples(*[st.integers(1, 40)] * 3),
)
def test_geometry_check_accepts_only_usable_geometry(spacing, origin, direction, size):
    geometry = Geometry(spacing, origin, direction)
    try:
        check_geometry(geometry, "scan.nii.gz", "P1")
    except InputError as err:
        assert "scan.nii.gz" in str(err) and "patient 'P1'" in str(err), str(err)
        event("refused")
        return
    event("accepted")
    # Accepted: finite, in range, a rotation; usable by SimpleITK and the preprocessing.
    lo, hi = SPACING_RANGE_MM
    assert all(lo <= s <= hi for s in spacing) and all(math.isfinite(o) for o in origin)
    matrix = np.reshape(direction, (3, 3))
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(3), atol=0.011)
    assert abs(np.linalg.det(geometry.affine_lps())) > 0
    image = to_sitk(np.zeros(size[::-1], np.float32), geometry)
    assert Geometry.of(image).close_to(geometry)
    cfg = DataConfig()
    grid = canonical_grid(geometry, size, cfg)
    assert np.isfinite(grid.geometry.origin).all() and np.isfinite(grid.geometry.spacing).all()
    try:
        check_coverage(geometry, size, cfg, "scan.nii.gz", "P1")
    except InputError as err:
        assert "far too small" in str(err) and "patient 'P1'" in str(err), str(err)


def _token(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory):
    """A worker process that reads volumes, so a hang in ITK fails the test, not the run."""
    worker = _Worker(tmp_path_factory.mktemp("reader") / "worker-stderr.log")
    yield worker
    worker.close()


@settings(max_examples=150, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(
    spacing=st.tuples(_SPACING, _SPACING, _SPACING),
    origin=st.tuples(_ORIGIN, _ORIGIN, _ORIGIN),
    direction=directions(),
    size=st.tuples(*[_mostly(st.integers(1, 6), st.sampled_from([0, -1, 2**40]))] * 3),
    data_fraction=st.sampled_from([1.0, 1.0, 0.5, 2.0]),
)
def test_metaimage_geometry_reads_or_says_why(
    manifest_dir, reader, spacing, origin, direction, size, data_fraction
):
    """Any geometry in a MetaImage header: a usable Volume, or a clear InputError."""
    voxels = max(0, math.prod(size)) if max(size) < 2**20 else 64
    fields = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        "TransformMatrix = " + " ".join(_token(v) for v in direction),
        "Offset = " + " ".join(_token(v) for v in origin),
        "ElementSpacing = " + " ".join(_token(v) for v in spacing),
        "DimSize = " + " ".join(str(v) for v in size),
        "ElementType = MET_SHORT",
        "ElementDataFile = LOCAL",
    ]
    path = manifest_dir / "geometry.mha"
    path.write_bytes(("\n".join(fields) + "\n").encode() + bytes(int(2 * voxels * data_fraction)))
    result = reader.read(path)  # read_one: read_volume, then the Volume checked
    event(result["status"])
    assert result["status"] in ("ok", "error"), (result, path.read_bytes()[:600])


# --------------------------------------------------------------------------- (c) mutations

FORMATS = ("nii.gz", "nii", "nrrd", "mha", "nhdr", "mhd", "dicom")
# Mutants per format; a DICOM read (three files through pydicom and GDCM) costs most.
# nhdr/mhd: detached headers (only the header is mutated; the data file stays valid).
N_MUTATIONS = {
    "nii.gz": 200, "nii": 200, "nrrd": 200, "mha": 200, "nhdr": 100, "mhd": 100, "dicom": 150,
}  # fmt: skip
# Whole header lines that have crashed or hung ITK's readers (or nearly), injected as is.
_DANGEROUS_LINES = {
    "nrrd": (
        "data file: seed.raw.gz", "data file: f%d.raw 0 2147483647 1", "data file: f%d.raw 0 3 0",
        "data file: LIST", "line skip: 99999999", "byte skip: -1", "encoding: bzip2",
        "dimension: 100", "sizes: 4294967297 1 1", "space dimension: 17",
        "space directions: (1e308,0,0) (0,1,0) (0,0,1)", "space origin: (nan,nan,nan)",
    ),
    "meta": (
        "NDims = 100", "NDims = -1", "NDims = 1e10", "HeaderSize = -1", "HeaderSize = 1e10",
        "ElementNumberOfChannels = 1000", "CompressedDataSize = 99999999999",
        "ElementDataFile = f%d.raw 0 3 0", "ElementDataFile = f%d.raw 0 2147483647 1",
        "ElementDataFile = LIST", "TransformMatrix = 1 0 0 -1.7976931348623157e+308 1 0 0 0 1",
        "DimSize = 2147483647 2147483647 2", "ElementType = MET_OTHER", "CompressedData = True",
    ),
}  # fmt: skip
READ_TIMEOUT_S = 20.0  # a read slower than this on a ~1 kB file is a hang
SEED_SHAPE = (4, 5, 6)  # (z, y, x)

_SPECIAL_INTS = (0, 1, -1, 2, 3, 4, 7, 8, 16, 255, 32767, -32768, 65535, 2**31 - 1, -(2**31))
_SPECIAL_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30, math.nan, math.inf, -math.inf)
_SPECIAL_TOKENS = (
    "0", "-1", "1", "2", "4", "17", "nan", "inf", "-inf", "1e308", "-1e-308", "99999999999",
    "4294967297", "3.5", "", "abc", "0x10", "(nan,0,0)", "none", "(0,0,0)",
    "-1.7976931348623157e+308", "1e160",
)  # fmt: skip

# NIfTI-1 header fields: (offset, struct code, count)
_NIFTI_FIELDS = {
    "sizeof_hdr": (0, "i", 1),
    "dim": (40, "h", 8),
    "intent": (56, "f", 3),
    "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1),
    "slice_start": (74, "h", 1),
    "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1),
    "scl_slope": (112, "f", 1),
    "scl_inter": (116, "f", 1),
    "slice_end": (120, "h", 1),
    "xyzt_units": (123, "b", 1),
    "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1),
    "quatern": (256, "f", 6),
    "srow": (280, "f", 12),
    "magic": (344, "4s", 1),
}

# DICOM attributes worth tampering with, and values to try (pydicom keyword -> values).
_DICOM_VALUES: dict[str, tuple] = {
    "Rows": (0, 1, 2, 4, 7, 65535),
    "Columns": (0, 1, 3, 5, 65535),
    "BitsAllocated": (0, 1, 8, 12, 32, 64),
    "BitsStored": (0, 1, 8, 12, 17, 32),
    "HighBit": (0, 7, 15, 31),
    "PixelRepresentation": (0, 1, 2),
    "SamplesPerPixel": (0, 2, 3),
    "PhotometricInterpretation": ("RGB", "YBR_FULL", "PALETTE COLOR", "MONOCHROME1", ""),
    "PlanarConfiguration": (0, 1),
    "PixelSpacing": ([0, 0], [-1, 1], ["nan", 1], [1e-30, 1], [1e30, 1], [1]),
    "ImagePositionPatient": (["nan", 0, 0], [0, 0], [1e30, 0, 0], [0, 0, 0]),
    "ImageOrientationPatient": ([0] * 6, [1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0], ["nan"] * 6),
    "RescaleSlope": (0, -1, "nan", "inf", 1e30, "abc"),
    "RescaleIntercept": ("nan", "inf", 1e38, "x"),
    "NumberOfFrames": (0, 2, -1, "abc"),
    "Modality": ("MR", "", "SEG"),
    "SeriesInstanceUID": ("1.2.3.4", ""),
    "SOPInstanceUID": ("",),
    "TransferSyntaxUID": (
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.90",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.3.4.5",  # unknown
    ),
    "PixelData": ("truncate", "extend", "empty", "delete"),
}


def _write_seeds(folder: Path) -> dict[str, Path]:
    """A small valid volume in each format, and a 3-slice DICOM series.

    A detached header's data file lies beside it (``seed.raw.gz``, ``seed.zraw``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    geometry = Geometry((0.7, 0.8, 2.5), (-12.5, 30.25, 101.0), OBLIQUE_DIRECTION)
    array = (np.arange(np.prod(SEED_SHAPE)).reshape(SEED_SHAPE) * 7 - 60).astype(np.int16)
    seeds = {fmt: write_volume(folder / f"seed.{fmt}", array, geometry) for fmt in FORMATS[:-1]}
    seeds["dicom"], _, _ = make_dicom_series(
        folder / "seed_dicom", shape=(3, 5, 6), series_uid="1.2.826.0.1.3680043.8.498.1"
    )
    return seeds


def _pos(rng: random.Random, data: bytes | bytearray, header: int = 400) -> int:
    """A position, half the time inside the first ``header`` bytes."""
    n = max(len(data), 1)
    return rng.randrange(min(header, n)) if rng.random() < 0.5 else rng.randrange(n)


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One generic byte-level mutation."""
    buf = bytearray(data)
    op = rng.choice(("flip", "flip", "truncate", "insert", "delete", "overwrite"))
    if op == "flip":
        k = rng.randint(1, 8)
        for _ in range(k):
            i = _pos(rng, buf)
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip {k} bits"
    if op == "truncate":
        n = rng.randrange(len(buf))
        return bytes(buf[:n]), f"truncate to {n} bytes"
    if op == "insert":
        i, n = _pos(rng, buf), rng.randint(1, 64)
        buf[i:i] = rng.randbytes(n)
        return bytes(buf), f"insert {n} random bytes at {i}"
    if op == "delete":
        i, n = _pos(rng, buf), rng.randint(1, 64)
        del buf[i : i + n]
        return bytes(buf), f"delete {n} bytes at {i}"
    i = _pos(rng, buf)
    value = rng.choice(_SPECIAL_INTS)
    raw = struct.pack("<q", value)[: rng.choice((1, 2, 4, 8))]
    buf[i : i + len(raw)] = raw
    return bytes(buf), f"overwrite {len(raw)} bytes at {i} with {value}"


def _tamper_nifti(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Set one NIfTI-1 header field (or one element of it) to a special value."""
    buf = bytearray(data)
    name = rng.choice(sorted(_NIFTI_FIELDS))
    offset, code, count = _NIFTI_FIELDS[name]
    k = rng.randrange(count)
    if code == "4s":
        value: object = rng.choice((b"ni1\0", b"n+2\0", b"\0\0\0\0", b"n+1\0"))
    elif code == "f":
        value = rng.choice(_SPECIAL_FLOATS + (rng.uniform(-1e4, 1e4),))
    else:
        bits = {"b": 8, "h": 16, "i": 32}[code]
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        value = min(max(rng.choice(_SPECIAL_INTS), lo), hi)
    size = struct.calcsize(code)
    struct.pack_into("<" + code, buf, offset + k * size, value)
    return bytes(buf), f"NIfTI {name}[{k}] = {value!r}"


def _tamper_text_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Change a field of a text header (NRRD, MetaImage) before its binary data."""
    if data.startswith(b"NRRD"):
        split = data.find(b"\n\n") + 2 if b"\n\n" in data else len(data)
    else:
        match = re.search(rb"^ElementDataFile *=[^\n]*\n", data, re.MULTILINE)
        split = match.end() if match else len(data)
    header, body = data[:split].decode("latin-1"), data[split:]
    lines = header.split("\n")
    i = rng.randrange(len(lines) - 1)
    op = rng.choice(("token", "token", "token", "delete", "duplicate", "swap", "inject"))
    if op == "inject":
        line = rng.choice(_DANGEROUS_LINES["nrrd" if data.startswith(b"NRRD") else "meta"])
        key = re.split(r"[:=]", line)[0]
        same = [k for k, old in enumerate(lines) if old.startswith(key)]
        k = same[0] if same else i
        lines[k : k + bool(same)] = [line]
        what = f"header line {k} := {line!r}"
    elif op == "delete":
        del lines[i]
        what = f"delete header line {i}"
    elif op == "duplicate":
        lines.insert(i, lines[i])
        what = f"duplicate header line {i}"
    elif op == "swap":
        j = rng.randrange(len(lines) - 1)
        lines[i], lines[j] = lines[j], lines[i]
        what = f"swap header lines {i} and {j}"
    else:
        tokens = list(re.finditer(r"[A-Za-z_]+|[-+0-9.eE]+", lines[i])) or [re.match("", lines[i])]
        token = rng.choice(tokens)
        new = rng.choice(
            _SPECIAL_TOKENS
            + ("double", "float", "uchar", "int", "MET_DOUBLE", "MET_UCHAR", "MET_INT", "raw",
               "gzip", "bzip2", "ascii", "big", "False", "True", "bogus")
        )  # fmt: skip
        lines[i] = lines[i][: token.start()] + new + lines[i][token.end() :]
        what = f"header line {i}: {token.group()!r} -> {new!r}"
    return "\n".join(lines).encode("latin-1") + body, what


def _mutate_file(fmt: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if fmt == "nii.gz":
        if rng.random() < 0.3:  # damage the compressed stream itself
            return _mutate_bytes(data, rng)
        inner, what = _mutate_file("nii", gzip.decompress(data), rng)
        return gzip.compress(inner, mtime=0), f"inside gzip: {what}"
    if rng.random() < 0.5:
        return _mutate_bytes(data, rng)
    if fmt == "nii":
        return _tamper_nifti(data, rng)
    return _tamper_text_header(data, rng)


def _tamper_dicom(path: Path, rng: random.Random) -> str:
    """Set one attribute of one slice file to an odd value (pydicom writes it)."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom's "invalid value": intended
        return _set_dicom_value(pydicom.dcmread(path), path, rng)


def _set_dicom_value(ds, path: Path, rng: random.Random) -> str:
    keyword = rng.choice(sorted(_DICOM_VALUES))
    value = rng.choice(_DICOM_VALUES[keyword])
    if keyword == "TransferSyntaxUID":
        ds.file_meta.TransferSyntaxUID = value
    elif keyword == "PixelData":
        if value == "delete":
            del ds.PixelData
        else:
            pixels = ds.PixelData
            ds.PixelData = {
                "truncate": pixels[: len(pixels) // 3],
                "extend": pixels + pixels,
                "empty": b"",
            }[value]
    elif isinstance(value, list):
        setattr(ds, keyword, [str(v) if isinstance(v, str) else v for v in value])
    else:
        try:
            setattr(ds, keyword, value)
        except (TypeError, ValueError):  # pydicom refuses some values for some VRs
            ds[keyword].value = str(value)
    ds.save_as(path, enforce_file_format=False)
    return f"{path.name}: {keyword} = {value!r}"


def make_mutant(seeds: dict[str, Path], fmt: str, index: int, folder: Path) -> tuple[Path, str]:
    """Write mutant ``index`` of ``fmt`` into ``folder``; returns its path and what was done.

    The mutation depends only on ``(fmt, index)`` and the seed files.
    """
    rng = random.Random(f"{fmt}-{index}")
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("nhdr", "mhd"):  # the header names its data file: put a copy beside it
        for data_file in seeds[fmt].parent.glob(f"seed.{'raw.gz' if fmt == 'nhdr' else 'zraw'}"):
            if not (folder / data_file.name).exists():
                shutil.copy(data_file, folder / data_file.name)
    if fmt != "dicom":
        data, what = _mutate_file(fmt, seeds[fmt].read_bytes(), rng)
        path = folder / f"m{index:03d}.{fmt}"
        path.write_bytes(data)
        return path, what
    path = folder / f"m{index:03d}"
    shutil.copytree(seeds["dicom"], path)
    victim = rng.choice(sorted(path.iterdir()))
    if rng.random() < 0.4:
        data, what = _mutate_bytes(victim.read_bytes(), rng)
        victim.write_bytes(data)
        what = f"{victim.name}: {what}"
    else:
        try:
            what = _tamper_dicom(victim, rng)
        except Exception as err:  # noqa: BLE001 - pydicom could not write it: use bytes
            data, what = _mutate_bytes(victim.read_bytes(), rng)
            victim.write_bytes(data)
            what = f"{victim.name}: {what} (tag write failed: {type(err).__name__})"
    return path, what


# --------------------------------------------------------------------------- the worker


def _check_volume(volume) -> str | None:
    """Why a Volume that read_volume returned is not usable, or None."""
    a = volume.array
    if a.ndim != 3 or a.dtype != np.float32 or min(a.shape) < 1:
        return f"array {a.shape} {a.dtype}"
    if not np.isfinite(a).all():
        return "non-finite voxels"
    try:
        check_geometry(volume.geometry)
    except InputError as err:
        return f"read_volume returned a geometry it should refuse: {err}"
    return None


def read_one(path: str) -> dict[str, str]:
    """Read ``path`` with read_volume; classify the outcome."""
    try:
        volume = read_volume(path, "FUZZ")
    except LymphdxError as err:
        message = str(err)
        if path not in message or "'FUZZ'" not in message:
            return {"status": "bad message", "detail": message}
        if re.search(r"bad_alloc|MemoryError|Unable to allocate", message):
            return {"status": "allocation", "detail": message}
        return {"status": "error", "detail": message}
    except MemoryError as err:
        return {"status": "allocation", "detail": f"MemoryError: {err}"}
    except Exception as err:  # noqa: BLE001 - exactly what the fuzz looks for
        return {"status": "crash", "detail": f"{type(err).__name__}: {err}"[:500]}
    why = _check_volume(volume)
    return {"status": "invalid", "detail": why} if why else {"status": "ok", "detail": ""}


def serve() -> None:
    """Worker loop: read a path per stdin line, answer one JSON line per path."""
    import resource

    # A mutated header may promise terabytes: allocation must fail, not swamp the machine.
    limit = 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import lymphdx.io.dicom  # noqa: F401 - import once, before the first timed read
    import lymphdx.io.volumes  # noqa: F401

    for line in sys.stdin:
        start = time.perf_counter()
        result = read_one(line.rstrip("\n"))
        result["seconds"] = round(time.perf_counter() - start, 3)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class _Worker:
    """A ``serve()`` subprocess; ``read`` returns its answer, or a hang/crash record."""

    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.warm = False  # the first read also pays for the imports

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
        with self.log.open("ab") as stderr:  # the child keeps its own handle
            proc = subprocess.Popen(
                [sys.executable, "-c", "from tests.test_fuzz import serve; serve()"],
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        self.warm = False
        return proc

    def read(self, path: Path) -> dict[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=READ_TIMEOUT_S + (0 if self.warm else 60))
        if not ready:
            self.close()
            return {"status": "hang", "detail": f"no answer in {READ_TIMEOUT_S} s"}
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self.proc = None
            tail = self.log.read_text(errors="replace")[-300:]
            return {"status": "died", "detail": f"worker exit status {code}; stderr: {tail}"}
        self.warm = True
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None


def fuzz(folder: Path, counts_per_format: dict[str, int]) -> tuple[list[str], dict]:
    """Read the first ``n`` mutants of each format; returns failures and outcome counts.

    Mutants that end well are deleted; the others stay in ``folder`` for a look.
    """
    seeds = _write_seeds(folder / "seeds")
    worker = _Worker(folder / "worker-stderr.log")
    failures: list[str] = []
    counts: dict[str, dict[str, float]] = {}
    try:
        for fmt, n in counts_per_format.items():
            start = time.perf_counter()
            tally = counts.setdefault(fmt, {})
            for index in range(n):
                path, what = make_mutant(seeds, fmt, index, folder / fmt.replace(".", "_"))
                result = worker.read(path)
                status = result["status"]
                tally[status] = tally.get(status, 0) + 1
                if status in ("ok", "error"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                else:
                    failures.append(
                        f"{fmt} #{index} ({what}) -> {status}: {result['detail']} [{path}]"
                    )
            tally["seconds"] = round(time.perf_counter() - start, 1)
    finally:
        worker.close()
    return failures, counts


def test_read_volume_survives_mutated_files(tmp_path):
    start = time.perf_counter()
    failures, counts = fuzz(tmp_path, N_MUTATIONS)
    print(f"fuzz: {time.perf_counter() - start:.1f} s; outcomes {counts}")
    assert not failures, f"{len(failures)} bad outcomes:\n" + "\n".join(failures[:30])
    for fmt in FORMATS:  # the fuzz must reach both outcomes, or it tests nothing
        assert counts[fmt].get("error", 0) > 0, counts
        assert counts[fmt].get("ok", 0) > 0, counts


def _main(argv: list[str]) -> None:
    """``python -m tests.test_fuzz [FORMAT [INDEX | COUNT]]``.

    No argument: the test's fuzz run. FORMAT and INDEX: that mutant, read in-process (a
    reproducer). FORMAT and ``xN``: the first N mutants of FORMAT through the worker.
    """
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lymphdx-fuzz-"))
    if not argv or argv[-1].startswith("x"):
        n = {argv[0]: int(argv[1][1:])} if len(argv) == 2 else N_MUTATIONS
        failures, counts = fuzz(folder, n)
        print(json.dumps(counts, indent=1))
        print("\n".join(failures) or "no failures")
        return
    seeds = _write_seeds(folder / "seeds")
    fmt = argv[0]
    indices = [int(argv[1])] if len(argv) > 1 else range(N_MUTATIONS[fmt])
    for index in indices:
        path, what = make_mutant(seeds, fmt, index, folder / "mutants")
        print(fmt, index, what, "->", read_one(str(path)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
