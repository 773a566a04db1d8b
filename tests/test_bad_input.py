"""The bad-input matrix: every fault a user can feed lymphdx, each a row.

Each row builds its fault in a temporary folder, calls the entry point a real run goes
through (the library function that training or prediction calls, or the command line),
and checks three things: the error is a :class:`~lymphdx.core.errors.LymphdxError` (exit
status 2 on the command line, no traceback); its message names the file, the patient
(where there is one) and the problem; and nothing half-written is left behind (no
``splits.csv`` or cache entry for refused data, no temporary files, no partial outputs).

Faults already pinned in detail elsewhere (test_io, test_dicom, test_manifest) appear
here as one cheap row each, so the matrix is the complete list.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.config import DataConfig, load_config
from lymphdx.core.errors import ConfigError, InputError, LymphdxError
from lymphdx.data.manifest import load_manifests
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.data.splits import resolve_splits
from lymphdx.io.geometry import Geometry
from lymphdx.io.volumes import write_volume
from tests.conftest import tiny_config
from tests.helpers import make_dicom_series, write_csv

runner = CliRunner()


def _permissions_enforced() -> bool:
    """False for root (unless its capability to ignore file modes was dropped)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o500)
        try:
            (Path(folder) / "probe").touch()
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o700)
    return False


needs_permissions = pytest.mark.skipif(
    not _permissions_enforced(), reason="file modes are not enforced (running as root)"
)

SHAPE = (8, 10, 12)  # (z, y, x)
GEOMETRY = Geometry((2.0, 2.0, 3.0), (-10.0, 5.0, 20.0))
PAPER_WEAK, PAPER_STRONG = (90, 10, 23), (62, 7, 16)


# --------------------------------------------------------------------------- helpers


def scan(path: Path, array: np.ndarray | None = None, geometry: Geometry = GEOMETRY) -> Path:
    """A small CT-like volume (or ``array``) written to ``path``."""
    if array is None:
        seed = int.from_bytes(path.name.encode(), "little") % 2**32  # every file its own content
        array = np.random.default_rng(seed).normal(0, 100, SHAPE).astype(np.int16)
    return write_volume(path, array, geometry)


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders (``.tmp-*``, ``.old-*``) anywhere under ``root``."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-"))
    )


def assert_clear(message: str, file: Path | None, patient: str | None, *words: str) -> None:
    """The message names the file, the patient and the problem."""
    if file is not None:
        assert str(file) in message, message
    if patient is not None:
        assert f"patient {patient!r}" in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)


@dataclass
class Fault:
    """A bad input ready to be fed to ``call``; what the error must name; what must not exist."""

    call: Callable[[], object]
    file: Path | None
    patient: str | None
    words: tuple[str, ...]
    absent: tuple[Path, ...] = ()
    error: type[LymphdxError] = InputError
    uncached: str = "*.npy"  # cache entries that must not exist afterwards


# --------------------------------------------------------------------------- manifests


def manifests(
    tmp: Path,
    weak_rows: list[list[object]] | None = None,
    strong_rows: list[list[object]] | None = None,
    weak_header: tuple[str, ...] = ("patient_id", "image", "label", "split"),
) -> tuple[Path, Path]:
    """Weak and strong manifests whose image/mask files exist (real volumes).

    The default weak set has a split column with both classes in every split.
    """
    if weak_rows is None:
        splits = ["train", "train", "val", "val", "test", "test"]
        weak_rows = [[f"W{i}", f"w{i}.nii.gz", i % 2, s] for i, s in enumerate(splits)]
    if strong_rows is None:
        strong_rows = [[f"S{i}", f"s{i}.nii.gz", f"s{i}_mask.nii.gz"] for i in range(2)]
    for row in weak_rows:
        if len(row) > 1 and str(row[1]).endswith(".nii.gz"):
            scan(tmp / "weak" / str(row[1]))
    for row in strong_rows:
        scan(tmp / "strong" / str(row[1]))
        write_volume(tmp / "strong" / str(row[2]), np.zeros(SHAPE, np.uint8), GEOMETRY)
    weak = write_csv(tmp / "weak" / "weak.csv", weak_header, weak_rows)
    strong = write_csv(tmp / "strong" / "strong.csv", ("patient_id", "image", "mask"), strong_rows)
    return weak, strong


def manifest_fault(tmp: Path, weak: Path, strong: Path, file: Path, patient, *words) -> Fault:
    return Fault(lambda: load_manifests(weak, strong), file, patient, words)


def split_fault(tmp: Path, weak: Path, strong: Path, patient, *words) -> Fault:
    run = tmp / "run"

    def call():
        w, s = load_manifests(weak, strong)
        return resolve_splits(w, s, run, PAPER_WEAK, PAPER_STRONG, 0)

    return Fault(call, weak, patient, words, absent=(run / "splits.csv",))


def case_manifest_missing(tmp):
    weak, strong = manifests(tmp)
    weak.unlink()
    return manifest_fault(tmp, weak, strong, weak, None, "does not exist")


def case_manifest_missing_column(tmp):
    rows = [["W1", "w1.nii.gz"], ["W2", "w2.nii.gz"]]
    weak, strong = manifests(tmp, rows, weak_header=("patient_id", "image"))
    return manifest_fault(tmp, weak, strong, weak, None, "lacks required column", "label")


def case_manifest_bad_label(tmp):
    rows = [["W1", "w1.nii.gz", 1], ["W2", "w2.nii.gz", "yes"]]
    weak, strong = manifests(tmp, rows, weak_header=("patient_id", "image", "label"))
    return manifest_fault(tmp, weak, strong, weak, "W2", "label must be 0 or 1", "'yes'")


def case_manifest_duplicate_patient(tmp):
    rows = [["W1", "w1.nii.gz", 1], ["W1", "w2.nii.gz", 0]]
    weak, strong = manifests(tmp, rows, weak_header=("patient_id", "image", "label"))
    return manifest_fault(tmp, weak, strong, weak, "W1", "duplicate patient id")


def case_manifest_missing_image(tmp):
    rows = [["W1", "w1.nii.gz", 1], ["W2", "gone.nii.gz", 0]]
    weak, strong = manifests(tmp, rows, weak_header=("patient_id", "image", "label"))
    (tmp / "weak" / "gone.nii.gz").unlink()
    return manifest_fault(tmp, weak, strong, weak, "W2", "gone.nii.gz", "does not exist")


def case_manifest_missing_mask(tmp):
    weak, strong = manifests(tmp)
    (tmp / "strong" / "s1_mask.nii.gz").unlink()
    return manifest_fault(tmp, weak, strong, strong, "S1", "mask", "does not exist")


def case_manifest_unknown_split(tmp):
    rows = [["W1", "w1.nii.gz", 1, "train"], ["W2", "w2.nii.gz", 0, "validation"]]
    weak, strong = manifests(tmp, rows)
    return manifest_fault(tmp, weak, strong, weak, "W2", "unknown split 'validation'")


def case_manifest_not_utf8(tmp):
    weak, strong = manifests(tmp)
    weak.write_bytes("patient_id,image,label\nPé,w0.nii.gz,1\n".encode("latin-1"))
    return manifest_fault(tmp, weak, strong, weak, None, "not UTF-8")


def case_manifest_broken_quote(tmp):
    weak, strong = manifests(tmp)
    weak.write_text('patient_id,image,label\n"W0,w0.nii.gz,1\nW1,w1.nii.gz,0\n')
    return manifest_fault(tmp, weak, strong, weak, None, "not valid CSV")


def case_same_patient_in_both_sets(tmp):
    strong_rows = [["W3", "s0.nii.gz", "s0_mask.nii.gz"], ["S1", "s1.nii.gz", "s1_mask.nii.gz"]]
    weak, strong = manifests(tmp, strong_rows=strong_rows)
    return manifest_fault(tmp, weak, strong, weak, "W3", "appear in both", str(strong))


# --------------------------------------------------------------------------- splits


def _split_rows(splits_and_labels: list[tuple[str, int]]) -> list[list[object]]:
    return [[f"W{i}", f"w{i}.nii.gz", y, s] for i, (s, y) in enumerate(splits_and_labels)]


def case_split_val_one_class(tmp):
    rows = _split_rows([("train", 0), ("train", 1), ("val", 0), ("val", 0), ("test", 0)])
    rows.append(["W5", "w5.nii.gz", 1, "test"])
    rows.append(["W6", "w6.nii.gz", 1, "train"])  # 3 positives: a split column can hold them
    weak, strong = manifests(tmp, rows)
    return split_fault(
        tmp, weak, strong, None, "val split holds only label 0", "AUC is undefined", "split column"
    )


def case_split_test_one_class(tmp):
    rows = _split_rows([("train", 0), ("train", 1), ("val", 0), ("val", 1), ("test", 1)])
    rows.append(["W5", "w5.nii.gz", 1, "test"])
    weak, strong = manifests(tmp, rows)
    return split_fault(
        tmp, weak, strong, None, "test split holds only label 1", "AUC is undefined", "fix:"
    )


def case_split_empty(tmp):
    rows = _split_rows([("train", 0), ("train", 1), ("test", 0), ("test", 1)])
    weak, strong = manifests(tmp, rows)
    return split_fault(tmp, weak, strong, None, "val split holds no patients")


def case_split_seeded_too_few_positives(tmp):
    rows = [[f"W{i}", f"w{i}.nii.gz", int(i < 2)] for i in range(12)]
    weak, strong = manifests(tmp, rows, weak_header=("patient_id", "image", "label"))
    # no split shares give 3 splits both labels from 2 positives: only more positives help
    return split_fault(
        tmp,
        weak,
        strong,
        None,
        "AUC is undefined",
        "only 2 of the 12 patients are labelled 1",
        "add patients labelled 1",
    )


def case_split_saved_one_class(tmp):
    rows = [[f"W{i}", f"w{i}.nii.gz", i % 2] for i in range(6)]  # no split column
    weak, strong = manifests(tmp, rows, weak_header=("patient_id", "image", "label"))
    saved = tmp / "run" / "splits.csv"
    rows = [["weak", f"W{i}", s, i % 2] for i, s in enumerate(["train"] * 4 + ["val", "test"])]
    rows += [["strong", "S0", "train", ""], ["strong", "S1", "val", ""]]
    write_csv(saved, ("set", "patient_id", "split", "label"), rows)
    text = saved.read_text()

    def call():
        w, s = load_manifests(weak, strong)
        try:
            return resolve_splits(w, s, tmp / "run", PAPER_WEAK, PAPER_STRONG, 0)
        finally:
            assert saved.read_text() == text  # left as it was

    return Fault(call, saved, None, ("val split holds only label 0", "run folder's splits.csv"))


# --------------------------------------------------------------------------- scans


def image_fault(tmp: Path, path: Path, *words: str, cfg: DataConfig | None = None) -> Fault:
    """``path`` read for training: the preprocessing cache reads and resamples it."""
    cache = tmp / "cache"
    cfg = cfg or DataConfig()
    return Fault(lambda: PreprocessCache(cache, cfg).image(path, "P1"), path, "P1", words)


def case_scan_missing(tmp):
    return image_fault(tmp, tmp / "nope.nii.gz", "does not exist")


def case_scan_empty_file(tmp):
    path = tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return image_fault(tmp, path, "cannot read")


def case_scan_random_bytes(tmp):
    path = tmp / "junk.nrrd"
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    return image_fault(tmp, path, "cannot read")


def case_scan_truncated_gzip(tmp):
    good = scan(tmp / "good.nii.gz").read_bytes()
    path = tmp / "cut.nii.gz"
    path.write_bytes(good[: len(good) // 2])
    return image_fault(tmp, path, "truncated")


def case_scan_nan_voxels(tmp):
    array = np.zeros(SHAPE, np.float32)
    array[1, 2, 3] = np.nan
    return image_fault(tmp, scan(tmp / "nan.nii.gz", array), "1 voxels are NaN or infinite")


def case_scan_2d(tmp):
    path = tmp / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.int16)), str(path))
    return image_fault(tmp, path, "2-D")


def case_scan_nifti_infinite_sform(tmp):
    # ITK's NIfTI reader loops forever on this header: it must be refused before.
    data = bytearray(scan(tmp / "good.nii").read_bytes())
    struct.pack_into("<f", data, 280 + 4 * 5, math.inf)
    path = tmp / "inf_sform.nii"
    path.write_bytes(bytes(data))
    return image_fault(tmp, path, "corrupt NIfTI header", "sform")


def case_scan_nifti_zero_voxel_size(tmp):
    # ITK would silently read a zero voxel size as 1 mm.
    data = bytearray(gzip.decompress(scan(tmp / "good.nii.gz").read_bytes()))
    struct.pack_into("<f", data, 76 + 4 * 3, 0.0)
    path = tmp / "zero_pixdim.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    return image_fault(tmp, path, "corrupt NIfTI header", "voxel size")


def _nifti_patched(tmp: Path, name: str, *patches: tuple[int, str, float]) -> Path:
    """A good single-file NIfTI (qform and sform both code 1) with header fields patched."""
    data = bytearray(scan(tmp / "good.nii").read_bytes())
    for offset, fmt, value in patches:
        struct.pack_into("<" + fmt, data, offset, value)
    path = tmp / name
    path.write_bytes(bytes(data))
    return path


def case_scan_nifti_qform_sform_disagree(tmp):
    # ITK would use the qform here (sform_code 2, the two differ), nibabel the sform.
    path = _nifti_patched(tmp, "q_vs_s.nii", (254, "h", 2), (280 + 4 * 3, "f", 60.0))
    return image_fault(tmp, path, "contradictory NIfTI header", "qform", "sform", "apart")


def case_scan_nifti_sheared_sform(tmp):
    # A sform with shear (a gantry tilt left in): no SimpleITK direction can hold it.
    path = _nifti_patched(tmp, "shear.nii", (252, "h", 0), (280 + 4 * 2, "f", 1.0))
    return image_fault(tmp, path, "contradictory NIfTI header", "shears", "degrees")


def case_scan_nifti_micrometres(tmp):
    # ITK would scale the voxel size by 1/1000 but not the position.
    path = _nifti_patched(tmp, "um.nii", (123, "B", 3))
    return image_fault(tmp, path, "xyzt_units", "micrometres")


def _mha(path: Path, lines: dict[str, str], data: bytes) -> Path:
    fields = {
        "ObjectType": "Image",
        "NDims": "3",
        "BinaryData": "True",
        "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False",
        "TransformMatrix": "1 0 0 0 1 0 0 0 1",
        "Offset": "0 0 0",
        "ElementSpacing": "1 1 1",
        "DimSize": "8 8 8",
        "ElementType": "MET_SHORT",
        **lines,
        "ElementDataFile": "LOCAL",
    }
    text = "".join(f"{k} = {v}\n" for k, v in fields.items())
    path.write_bytes(text.encode() + data)
    return path


def case_scan_sheared_direction(tmp):
    path = _mha(tmp / "sheared.mha", {"TransformMatrix": "1 0 0 1 1 0 0 0 1"}, bytes(1024))
    return image_fault(tmp, path, "direction cosines", "not an orthonormal")


def case_scan_singular_direction(tmp):
    path = _mha(tmp / "flat.mha", {"TransformMatrix": "1 0 0 0 1 0 0 0 0"}, bytes(1024))
    return image_fault(tmp, path, "cannot read", "determinant is 0")


def case_scan_nan_spacing(tmp):
    path = _mha(tmp / "nan_spacing.mha", {"ElementSpacing": "1 nan 1"}, bytes(1024))
    return image_fault(tmp, path, "corrupt header", "ElementSpacing holds nan")


def case_scan_huge_spacing(tmp):
    path = _mha(tmp / "metres.mha", {"ElementSpacing": "1 1 5000"}, bytes(1024))
    return image_fault(tmp, path, "voxel spacing", "outside")


def case_scan_metaimage_matrix_near_max_double(tmp):
    # ITK's MetaImage reader never returns on this header: it must be refused before.
    matrix = "1 0 0 -1.7976931348623157e+308 1 0 0 0 1"
    path = _mha(tmp / "hang.mha", {"TransformMatrix": matrix}, bytes(1024))
    return image_fault(tmp, path, "corrupt header", "TransformMatrix")


def case_scan_metaimage_negative_ndims(tmp):
    # MetaIO dies with a segfault on this header: it must be refused before.
    path = _mha(tmp / "segv.mha", {"NDims": "-1"}, bytes(1024))
    return image_fault(tmp, path, "corrupt header", "NDims is '-1'")


def case_scan_metaimage_file_pattern_step_zero(tmp):
    # MetaIO divides by the pattern's step: a zero kills the process (SIGFPE).
    for k in range(8):
        (tmp / f"slice{k}.raw").write_bytes(bytes(128))
    text = _mha(tmp / "x.mha", {}, b"").read_text()
    path = tmp / "pattern.mhd"
    path.write_text(text.replace("ElementDataFile = LOCAL", "ElementDataFile = slice%d.raw 0 7 0"))
    return image_fault(tmp, path, "corrupt header", "names 0 files")


def case_scan_nrrd_file_pattern_of_two_billion_files(tmp):
    # ITK's NRRD reader tries every name the pattern makes: hours for this header.
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n"
        "data file: slice%d.raw 0 2147483647 1\n"
    )
    path = tmp / "pattern.nhdr"
    path.write_text(header)
    return image_fault(tmp, path, "corrupt header", "names 2147483648 files")


def case_scan_nrrd_huge_space_directions(tmp):
    # ITK's NRRD reader drops these directions and reads the scan as 1 mm isotropic.
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        "sizes: 8 8 8\nspace directions: (1e160,0,0) (0,1,0) (0,0,1)\n"
        "kinds: domain domain domain\nendian: little\nencoding: raw\n"
        "space origin: (0,0,0)\n\n"
    )
    path = tmp / "huge_directions.nrrd"
    path.write_bytes(header.encode() + bytes(1024))
    return image_fault(tmp, path, "corrupt header", "space directions")


def case_scan_header_promises_terabytes(tmp):
    path = _mha(tmp / "huge.mha", {"DimSize": "100000 100000 100000"}, bytes(1024))
    return image_fault(tmp, path, "corrupt header", "promises", "voxels")


def case_scan_compressed_shorter_than_header(tmp):
    # ITK's MetaImage reader fills the missing voxels with garbage and says nothing.
    good = scan(tmp / "good.mha").read_bytes()
    path = tmp / "short.mha"
    path.write_bytes(re.sub(rb"DimSize = [0-9 ]+", b"DimSize = 12 10 80", good))
    return image_fault(tmp, path, "truncated", "promises")


def case_scan_far_too_small_crop(tmp):
    tiny = scan(tmp / "tiny.nii.gz", np.zeros((2, 4, 4), np.int16), Geometry((1, 1, 1), (0, 0, 0)))
    return image_fault(tmp, tiny, "far too small", "less than one voxel")


def case_scan_far_too_small_resize(tmp):
    thin = scan(
        tmp / "thin.nii.gz", np.zeros((30, 30, 2), np.int16), Geometry((1, 1, 1), (0, 0, 0))
    )
    cfg = DataConfig(fit="resize")
    return image_fault(tmp, thin, "far too small", "stretch", cfg=cfg)


def case_dicom_damaged_header(tmp):
    folder, _, _ = make_dicom_series(tmp / "ct", shape=(3, 8, 8))
    victim = sorted(folder.iterdir())[1]
    data = victim.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00"  # (0028,0010) Rows, US, 2 bytes
    i = data.index(rows)
    victim.write_bytes(
        data[:i] + b"\x28\x00\x10\x00US\x03\x00" + data[i + 8 : i + 10] + b"\0" + data[i + 10 :]
    )
    fault = image_fault(tmp, folder, "damaged DICOM header")
    fault.file = victim
    return fault


def case_dicom_two_series(tmp):
    folder = tmp / "two"
    make_dicom_series(folder, shape=(3, 8, 8), series_uid="1.2.826.0.1.3680043.1.1")
    make_dicom_series(folder, shape=(3, 8, 8), series_uid="1.2.826.0.1.3680043.1.2")
    return image_fault(tmp, folder, "2 DICOM series")


def case_dicom_folder_without_series(tmp):
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no scan here")
    return image_fault(tmp, folder, "no DICOM series")


# --------------------------------------------------------------------------- masks


def mask_fault(tmp: Path, mask: np.ndarray, geometry: Geometry = GEOMETRY, *words) -> Fault:
    image = scan(tmp / "img.nii.gz")
    path = write_volume(tmp / "mask.nii.gz", mask, geometry)
    cache = tmp / "cache"
    return Fault(
        lambda: PreprocessCache(cache, DataConfig()).mask(path, image, "S1"),
        path,
        "S1",
        words,
        uncached="mask-*.npy",  # the image itself is fine and may be cached
    )


def case_mask_geometry_differs(tmp):
    other = Geometry((2.0, 2.0, 3.0), (-10.0, 5.0, 50.0))
    return mask_fault(tmp, np.zeros(SHAPE, np.uint8), other, "mask geometry differs")


def case_mask_size_differs(tmp):
    return mask_fault(tmp, np.zeros((8, 10, 11), np.uint8), GEOMETRY, "mask size")


def case_mask_probability_map(tmp):
    mask = np.zeros(SHAPE, np.float32)
    mask[2:4, 3:5, 3:5] = 0.37
    return mask_fault(tmp, mask, GEOMETRY, "non-integer values", "0.37")


def case_mask_nan(tmp):
    mask = np.zeros(SHAPE, np.float32)
    mask[1, 1, 1] = np.nan
    return mask_fault(tmp, mask, GEOMETRY, "NaN")


def case_mask_negative(tmp):
    mask = np.zeros(SHAPE, np.int16)
    mask[1, 1, 1] = -1
    return mask_fault(tmp, mask, GEOMETRY, "negative values")


# --------------------------------------------------------------------------- config


def config_fault(tmp: Path, text: str, *words: str) -> Fault:
    path = tmp / "config.yaml"
    path.write_text(text)
    return Fault(lambda: load_config(path), path, None, words, error=ConfigError)


def case_config_unknown_key(tmp):
    return config_fault(tmp, "training:\n  epoch: 3\n", "unknown key 'training.epoch'")


def case_config_wrong_type(tmp):
    return config_fault(tmp, "training:\n  batch_size: four\n", "'training.batch_size'", "integer")


def case_config_bool_for_number(tmp):
    return config_fault(tmp, "training:\n  epochs: yes\n", "'training.epochs'", "not true/false")


def case_config_section_not_a_mapping(tmp):
    return config_fault(tmp, "model: 5\n", "'model'", "dictionary")


def case_config_shape_not_divisible(tmp):
    return config_fault(
        tmp, "data:\n  shape: [40, 48, 32]\n", "data.shape", "divisible", "downsampling factor 16"
    )


def case_config_shape_smaller_than_downsampling(tmp):
    return config_fault(tmp, "data:\n  shape: [8, 48, 32]\n", "data.shape", "divisible")


def case_config_spacing_not_positive(tmp):
    return config_fault(tmp, "data:\n  spacing: [0, 5, 6]\n", "'data.spacing'", "positive")


def case_config_not_yaml(tmp):
    return config_fault(tmp, "training: [epochs: 3\n", "not valid YAML")


def case_config_not_a_mapping(tmp):
    return config_fault(tmp, "- 1\n- 2\n", "must be a mapping")


CASES = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path) -> None:
    fault = CASES[name](tmp_path)
    with pytest.raises(LymphdxError) as err:
        fault.call()
    assert isinstance(err.value, fault.error), repr(err.value)
    message = str(err.value)
    assert "\n" not in message, message  # one line
    assert_clear(message, fault.file, fault.patient, *fault.words)
    assert not leftovers(tmp_path)
    for path in fault.absent:
        assert not path.exists(), path
    assert not list((tmp_path / "cache").rglob(fault.uncached)), "refused data was cached"


# --------------------------------------------------------------------------- command line


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_cli_error(code: int, output: str, file, patient, *words: str) -> str:
    """Exit status 2 and one ``lymphdx: error:`` line naming file, patient and problem."""
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("lymphdx: error:")]
    assert len(errors) == 1, output
    assert_clear(errors[0], file, patient, *words)
    return errors[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch supervised run on six small scans (seconds)."""
    from lymphdx.engine.train import train

    tmp = tmp_path_factory.mktemp("bad_input_run")
    weak, strong = manifests(tmp)
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1})
    train(config, tmp / "run", weak, strong, progress=False)
    return tmp / "run"


def _config_yaml(tmp: Path) -> Path:
    data = tiny_config(tmp, training={"epochs": 1}).model_dump(mode="json")
    data.pop("manifests")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_train_refuses_a_split_without_both_classes_before_writing_it(tmp_path):
    rows = _split_rows([("train", 0), ("train", 1), ("val", 1), ("val", 1), ("test", 0)])
    rows.append(["W5", "w5.nii.gz", 1, "test"])
    weak, strong = manifests(tmp_path, rows)
    run = tmp_path / "run"
    code, output = cli(
        "train",
        "--weak",
        weak,
        "--strong",
        strong,
        "--out",
        run,
        "--config",
        _config_yaml(tmp_path),
    )
    assert_cli_error(code, output, weak, None, "val split holds only label 1", "AUC is undefined")
    assert not (run / "splits.csv").exists()
    assert not (run / "checkpoints").exists()
    assert not leftovers(tmp_path)


def test_cli_train_refused_run_leaves_no_run_folder(tmp_path):
    rows = _split_rows([("train", 0), ("train", 1), ("val", 1), ("val", 1), ("test", 0)])
    rows.append(["W5", "w5.nii.gz", 1, "test"])
    weak, strong = manifests(tmp_path, rows)
    run = tmp_path / "run"
    config = _config_yaml(tmp_path)
    code, _ = cli("train", "--weak", weak, "--strong", strong, "--out", run, "--config", config)
    assert code == 2
    assert not (run / "config.yaml").exists()


def test_cli_train_refuses_a_patient_in_both_sets(tmp_path):
    strong_rows = [["W3", "s0.nii.gz", "s0_mask.nii.gz"], ["S1", "s1.nii.gz", "s1_mask.nii.gz"]]
    weak, strong = manifests(tmp_path, strong_rows=strong_rows)
    run = tmp_path / "run"
    code, output = cli(
        "train",
        "--weak",
        weak,
        "--strong",
        strong,
        "--out",
        run,
        "--config",
        _config_yaml(tmp_path),
    )
    assert_cli_error(code, output, weak, "W3", "appear in both", str(strong))
    assert not (run / "splits.csv").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("training:\n  epoch: 3\n", ("unknown key 'training.epoch'",)),
        ("training:\n  lr: fast\n", ("'training.lr'", "number")),
        ("data:\n  shape: [40, 48, 32]\n", ("data.shape", "divisible")),
    ],
    ids=["unknown-key", "wrong-type", "shape-vs-downsampling"],
)
def test_cli_config_errors_name_the_key_and_write_nothing(tmp_path, text, words):
    weak, strong = manifests(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    run = tmp_path / "run"
    code, output = cli(
        "train", "--weak", weak, "--strong", strong, "--out", run, "--config", config
    )
    assert_cli_error(code, output, config, None, *words)
    assert not run.exists()


# --------------------------------------------------------------------------- output folders


def _blocked(tmp: Path) -> Path:
    """A path whose parent is a file: no one, root included, can make it a folder."""
    (tmp / "a_file").write_text("not a folder")
    return tmp / "a_file" / "out"


def test_cli_synth_output_folder_not_writable(tmp_path):
    out = _blocked(tmp_path)
    code, output = cli("synth", "--out", out, "--n-weak", "2", "--n-pos", "1", "--n-strong", "1")
    assert_cli_error(code, output, out, None, "cannot write")
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_cli_synth_bad_counts(tmp_path):
    code, output = cli("synth", "--out", tmp_path / "d", "--n-weak", "2", "--n-pos", "5")
    assert_cli_error(code, output, None, None, "--n-pos")
    assert not (tmp_path / "d").exists()


def test_cli_train_output_folder_not_writable(tmp_path):
    weak, strong = manifests(tmp_path)
    out = _blocked(tmp_path)
    code, output = cli("train", "--weak", weak, "--strong", strong, "--out", out)
    assert_cli_error(code, output, None, None, "cannot write", str(out))


def test_cli_predict_output_folder_not_writable(tiny_run, tmp_path):
    image = scan(tmp_path / "scan.nii.gz")
    out = _blocked(tmp_path)
    code, output = cli("predict", "--model", tiny_run, image, "--out", out)
    assert_cli_error(code, output, out, None, "cannot write")


def test_cli_predict_missing_scan_writes_nothing(tiny_run, tmp_path):
    good = scan(tmp_path / "good.nii.gz")
    out = tmp_path / "out"
    code, output = cli("predict", "--model", tiny_run, good, tmp_path / "nope.nii.gz", "--out", out)
    assert_cli_error(code, output, tmp_path / "nope.nii.gz", None, "does not exist")
    assert not out.exists()


def test_cli_predict_corrupt_scan_leaves_only_complete_outputs(tiny_run, tmp_path):
    good = scan(tmp_path / "good.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good.read_bytes()[:200])
    out = tmp_path / "out"
    code, output = cli("predict", "--model", tiny_run, good, bad, "--out", out)
    assert_cli_error(code, output, bad, None, "truncated")
    assert sorted(p.name for p in out.iterdir()) == ["good", "summary.csv"]  # none for bad
    assert sorted(p.name for p in (out / "good").iterdir()) == [
        "findings.csv",
        "findings.mrk.json",
        "overlay.png",
        "prediction.json",
        "roi_mask.nii.gz",
        "roi_prob.nii.gz",
    ]
    assert not leftovers(tmp_path)


def test_cli_predict_far_too_small_scan(tiny_run, tmp_path):
    tiny = scan(
        tmp_path / "tiny.nii.gz", np.zeros((2, 3, 3), np.int16), Geometry((1, 1, 1), (0, 0, 0))
    )
    out = tmp_path / "out"
    code, output = cli("predict", "--model", tiny_run, tiny, "--out", out)
    assert_cli_error(code, output, tiny, None, "far too small")
    # no scan folder; the summary says why
    assert [p.name for p in out.iterdir()] == ["summary.csv"]
    assert "far too small" in (out / "summary.csv").read_text()


@needs_permissions
@pytest.mark.parametrize("command", ["synth", "train", "predict", "evaluate"])
def test_cli_read_only_output_folder(tiny_run, tmp_path, command):
    weak, strong = manifests(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    if command == "evaluate":  # the run folder itself is the output folder
        import shutil

        run = tmp_path / "locked" / "run"
        shutil.copytree(tiny_run, run)
        (run / "metrics.json").unlink(missing_ok=True)
        args: tuple = ("evaluate", run)
        target = run
    else:
        target = locked / "out"
        args = {
            "synth": ("synth", "--out", target, "--n-weak", "2", "--n-pos", "1", "--n-strong", "1"),
            "train": ("train", "--weak", weak, "--strong", strong, "--out", target),
            "predict": (
                "predict",
                "--model",
                tiny_run,
                scan(tmp_path / "s.nii.gz"),
                "--out",
                target,
            ),
        }[command]
        target = locked
    os.chmod(target, 0o500)
    try:
        code, output = cli(*args)
    finally:
        os.chmod(target, 0o700)
    assert_cli_error(code, output, None, None)
    assert re.search(r"cannot write|permission denied", output, re.IGNORECASE), output
    if command == "evaluate":
        assert not (target / "metrics.json").exists()
    else:
        assert not (locked / "out").exists()
