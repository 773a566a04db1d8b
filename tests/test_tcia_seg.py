"""prepare-tcia with TCIA's DICOM SEG masks: SEGs written with highdicom over the fixture's
CT series, in the collection's Patient/Study/Series tree, read back onto the CT's grid."""

from __future__ import annotations

import copy
import csv
import json
import random
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.errors import InputError
from lymphdx.data.manifest import load_strong_manifest
from lymphdx.io.dicom_headers import scan_folder
from lymphdx.io.dicom_seg_read import read_seg_on_stack
from lymphdx.io.dicom_stack import build_stack
from lymphdx.io.tcia import prepare_tcia, report_path
from lymphdx.io.volumes import read_mask, read_volume
from tests.helpers import CtSeries, TciaCase, make_tcia_tree

runner = CliRunner()
ONE = "ABD_LYMPH_001"


# --------------------------------------------------------------------------- fixture SEGs


def segment(number: int, label: str = "lymph node", lymph: bool = True):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.Tissue if lymph else codes.SCT.Organ,
        segmented_property_type=codes.SCT.LymphNode if lymph else codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def write_seg(
    path: Path,
    series: CtSeries,
    pixels: np.ndarray,
    *,
    kind: str = "BINARY",
    segments: Sequence | None = None,
    omit_empty_frames: bool = True,
) -> Path:
    """A SEG over ``series`` with highdicom: ``pixels[k]`` (``(z, y, x)`` labels, or
    ``(z, y, x, segments)``) lies on slice ``k`` (``series.files[k]``, position order)."""
    import highdicom as hd

    sources = [pydicom.dcmread(f) for f in series.files]
    extra = {"max_fractional_value": 200} if kind == "FRACTIONAL" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CT's one-component PatientName
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=getattr(hd.seg.SegmentationTypeValues, kind),
            segment_descriptions=list(segments or [segment(1)]),
            series_instance_uid=hd.UID(),
            series_number=300,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
            omit_empty_frames=omit_empty_frames,
            **extra,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def seg_path(case: TciaCase) -> Path:
    """Where the NBIA Data Retriever puts the patient's SEG series: beside the CT series."""
    return case.series.folder.parent / "300.000000-Segmentation-91234" / "1-1.dcm"


def frames(ds: pydicom.Dataset) -> np.ndarray:
    """The SEG's stored frames ``(F, rows, columns)``."""
    px = ds.pixel_array
    return px[None] if px.ndim == 2 else px


def set_frames(ds: pydicom.Dataset, pixels: np.ndarray, groups: list) -> None:
    """Replace the SEG's frames and their functional groups."""
    from pydicom.pixels import pack_bits

    ds.PerFrameFunctionalGroupsSequence = groups
    ds.NumberOfFrames = len(pixels)
    bits = int(ds.BitsAllocated)
    ds.PixelData = pack_bits(pixels.ravel()) if bits == 1 else pixels.astype(np.uint8).tobytes()


def rewrite(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def shuffle_frames(ds: pydicom.Dataset) -> None:
    order = list(range(int(ds.NumberOfFrames)))
    random.Random(3).shuffle(order)
    order = order[::-1] if order == sorted(order) else order
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    set_frames(ds, frames(ds)[order], [groups[i] for i in order])


def drop_references(ds: pydicom.Dataset) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def seg_tree(
    root: Path, patients: Sequence[str] = (ONE,), nifti: bool = False, **kw: object
) -> dict[str, TciaCase]:
    """A TCIA tree whose patients have a binary one-segment SEG of their nodes (and the
    legacy NIfTI masks only with ``nifti``); the SEG series is listed in metadata.csv."""
    cases = make_tcia_tree(root, patients=list(patients), **kw)  # type: ignore[arg-type]
    if not nifti:
        shutil.rmtree(root / "MED_ABD_LYMPH_MASKS")
    for case in cases.values():
        write_seg(seg_path(case), case.series, (case.mask != 0).astype(np.uint8))
    metadata = next(root.rglob("metadata.csv"), None)
    if metadata is not None:
        with metadata.open(newline="") as f:
            rows = list(csv.reader(f))
        for case in cases.values():
            folder = seg_path(case).parent.relative_to(metadata.parent)
            location = "\\".join([".", *folder.parts])
            rows.append(["1.2.3", "CT Lymph Nodes", case.patient, "SEG", "1", location])
        with metadata.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    return cases


def written_mask(out: Path, patient: str = ONE) -> np.ndarray:
    """The manifest's mask for ``patient``, checked to load on its image's grid with
    lymphdx's readers; returns its stored values ``(z, y, x)``."""
    record = next(r for r in load_strong_manifest(out) if r.patient_id == patient)
    volume = read_volume(record.image, patient)
    mask = read_mask(record.mask, volume.geometry, volume.array.shape, patient)
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(record.mask)))
    np.testing.assert_array_equal(mask.array, (values != 0).astype(np.uint8))
    return values


def one_result(report, patient: str = ONE):
    return next(p for p in report.patients if p.patient == patient)


# --------------------------------------------------------------------------- placement


def _three_segments(case: TciaCase) -> tuple[np.ndarray, list, np.ndarray]:
    ids = {1: 1, 2: 2, 5: 3}  # the NIfTI's node ids 1, 2, 5 as segments 1..3
    labels = np.zeros_like(case.mask)
    for node, number in ids.items():
        labels[case.mask == node] = number
    return labels, [segment(n, f"lymph node {n}") for n in (1, 2, 3)], labels


@pytest.mark.parametrize(
    "variant",
    ["binary", "frames_shuffled", "positions_only", "three_segments", "fractional", "labelmap"],
)
def test_seg_mask_equals_the_array_it_was_made_from(tmp_path, variant):
    cases = seg_tree(tmp_path / "dl")
    case = cases[ONE]
    path = seg_path(case)
    expected = (case.mask != 0).astype(np.uint8)
    if variant == "three_segments":
        labels, descriptions, expected = _three_segments(case)
        write_seg(path, case.series, labels, segments=descriptions)
    elif variant == "labelmap":
        labels, descriptions, expected = _three_segments(case)
        write_seg(path, case.series, labels, kind="LABELMAP", segments=descriptions)
    elif variant == "fractional":  # nodes at 0.8; a halo at 0.3 that must stay out
        halo = np.zeros(case.mask.shape, np.float32)
        halo[:, 10:20, 10:20] = 0.3
        fractions = np.where(case.mask != 0, np.float32(0.8), halo).astype(np.float32)
        write_seg(path, case.series, fractions, kind="FRACTIONAL")
    elif variant == "frames_shuffled":
        rewrite(path, shuffle_frames)
    elif variant == "positions_only":
        rewrite(path, drop_references)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG"
    if variant != "fractional":  # a frame per slice (and segment) that holds voxels
        numbers = [1, 2, 3] if variant == "three_segments" else [0]
        on = [np.any((expected == n) if n else expected, axis=(1, 2)) for n in numbers]
        assert int(ds.NumberOfFrames) == int(np.sum(on)) < len(case.series.files) * len(on)
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    result = one_result(report)
    assert result.status == "ok", result.problem
    assert result.mask_source == str(path)
    assert result.nodes == 3 and not result.nodes_outside  # the annotated centres are inside
    np.testing.assert_array_equal(written_mask(out), expected)
    if variant == "positions_only":
        assert "by their ImagePositionPatient" in result.aligned_by
    else:
        assert "by the CT slice they reference" in result.aligned_by


def test_seg_on_the_stack_with_slices_out_of_order_on_disk(tmp_path):
    """The reader alone: the CT's files are shuffled (names and InstanceNumber), the SEG
    covers slices 2, 3 and 6 only, in another frame order; the result is on the stack as
    build_stack sorts it, checked against the slices' positions."""
    from tests.helpers import write_ct_series

    series = write_ct_series(tmp_path / "ct", 8, crop=(16, 16), shuffle_seed=5)
    assert [f.name for f in series.files] != sorted(f.name for f in series.files)
    truth = np.zeros((8, 16, 16), np.uint8)
    truth[2, 3:6, 4:9] = 1
    truth[3, 5:9, 2:4] = 1
    truth[6, 0:2, 14:16] = 1
    path = write_seg(tmp_path / "seg" / "seg.dcm", series, truth)
    rewrite(path, shuffle_frames)
    assert int(pydicom.dcmread(path).NumberOfFrames) == 3
    (summary,), _ = scan_folder(series.folder)
    stack, _ = build_stack(summary.slices, series.folder)
    uids = [sop_uid(f) for f in stack.files]
    on_stack = read_seg_on_stack(path, stack, uids, "P001")
    order = [series.files.index(f) for f in stack.files]  # stack index -> position index
    assert order == sorted(order, key=lambda k: series.positions[k][2])
    np.testing.assert_array_equal(on_stack.array, truth[order])
    assert on_stack.segments == {1: "lymph node"} and not on_stack.warnings


def test_flat_layout_with_the_seg_in_the_ct_folder(tmp_path):
    cases = make_tcia_tree(tmp_path / "dl", layout="flat", patients=[ONE])
    shutil.rmtree(tmp_path / "dl" / "masks")
    case = cases[ONE]
    write_seg(case.series.folder / "seg.dcm", case.series, (case.mask != 0).astype(np.uint8))
    out = tmp_path / "strong.csv"
    result = one_result(prepare_tcia(tmp_path / "dl", out))
    assert result.status == "ok", result.problem
    assert any("holds 2 series: image written" in w for w in result.warnings)
    np.testing.assert_array_equal(written_mask(out), case.mask != 0)


# --------------------------------------------------------------------------- NIfTI and SEG


def test_with_both_masks_the_seg_is_used_and_compared(tmp_path):
    cases = seg_tree(tmp_path / "dl", patients=[ONE, "ABD_LYMPH_002"], nifti=True)
    two = cases["ABD_LYMPH_002"]
    fewer = (two.mask != 0) & (two.mask != 5)  # the SEG of patient 2 lacks node 5
    write_seg(seg_path(two), two.series, fewer.astype(np.uint8))
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    first, second = one_result(report), one_result(report, "ABD_LYMPH_002")
    assert "the NIfTI mask agrees voxel for voxel (y and x swapped)" in first.aligned_by
    assert first.mask_source == str(seg_path(cases[ONE]))
    n = int(np.count_nonzero(two.mask == 5))
    (warning,) = [w for w in second.warnings if "differs from the DICOM SEG" in w]
    assert f"in {n} voxel(s)" in warning and "the DICOM SEG is used" in warning
    assert f"ABD_LYMPH_002: {warning}" in report.lines()  # printed by the command
    np.testing.assert_array_equal(written_mask(out, "ABD_LYMPH_002"), fewer)
    assert second.nodes_outside and [o["line"] for o in second.nodes_outside] == [3]


def test_a_broken_seg_is_not_replaced_by_the_nifti_mask(tmp_path):
    cases = seg_tree(tmp_path / "dl", nifti=True)
    rewrite(seg_path(cases[ONE]), lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"))
    with pytest.raises(InputError) as err:
        prepare_tcia(tmp_path / "dl", tmp_path / "strong.csv")
    assert "FrameOfReferenceUID 1.2.3.4" in str(err.value)
    assert "_mask.nii.gz was not used: fix or remove the SEG" in str(err.value)


# --------------------------------------------------------------------------- bad SEGs


def _other_frame_of_reference(ds: pydicom.Dataset) -> None:
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.99.1"


def _missing_instance(ds: pydicom.Dataset) -> None:
    item = ds.PerFrameFunctionalGroupsSequence[1].DerivationImageSequence[0]
    item.SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.99.2"


def _off_slice(ds: pydicom.Dataset) -> None:  # no references, positions half a slice off
    drop_references(ds)
    for item in ds.PerFrameFunctionalGroupsSequence:
        position = item.PlanePositionSequence[0]
        x, y, z = (float(v) for v in position.ImagePositionPatient)
        position.ImagePositionPatient = [x, y, z + 1.25]


def _position_contradicts_reference(ds: pydicom.Dataset) -> None:
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    x, y, z = (float(v) for v in position.ImagePositionPatient)
    position.ImagePositionPatient = [x, y, z + 10.0]


def _rotated(ds: pydicom.Dataset) -> None:
    plane = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    plane.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]


def _other_size(ds: pydicom.Dataset) -> None:
    narrow = frames(ds)[:, :, :64]
    ds.Columns = 64
    set_frames(ds, narrow, list(ds.PerFrameFunctionalGroupsSequence))


def _locations_not_preserved(ds: pydicom.Dataset) -> None:
    item = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    item.SourceImageSequence[0].SpatialLocationsPreserved = "NO"


def _no_segment_data(ds: pydicom.Dataset) -> None:
    del ds.SegmentSequence


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            _other_frame_of_reference,
            ["FrameOfReferenceUID 1.2.826.0.1.3680043.99.1", "another scan"],
        ),
        (
            _missing_instance,
            ["not in the series", "SOPInstanceUID 1.2.826.0.1.3680043.99.2 (frame(s) 2)"],
        ),
        (_off_slice, ["cannot be put on the CT's slices", "frame 1 (position", "lies on none"]),
        (_position_contradicts_reference, ["cannot be put on the CT's slices", "frame 1"]),
        (_rotated, ["ImageOrientationPatient [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]"]),
        (_other_size, ["frames are 128 x 64 pixels, the CT's slices 128 x 128"]),
        (_locations_not_preserved, ["frame 1 says its pixels do not lie", "Preserved NO"]),
        (_no_segment_data, ["not a readable DICOM SEG"]),
    ],
    ids=[
        "frame_of_reference",
        "missing_instance",
        "off_slice",
        "contradiction",
        "rotated",
        "other_size",
        "locations_not_preserved",
        "damaged",
    ],
)
def test_bad_seg_is_refused_naming_the_patient_and_the_seg(tmp_path, change, words):
    cases = seg_tree(tmp_path / "dl", patients=[ONE, "ABD_LYMPH_002"])
    rewrite(seg_path(cases[ONE]), change)
    out = tmp_path / "strong.csv"
    code = runner.invoke(app, ["prepare-tcia", "--root", str(tmp_path / "dl"), "--out", str(out)])
    assert code.exit_code == 0, code.output
    assert "Traceback" not in code.output
    line = next(x for x in code.output.splitlines() if x.startswith(f"{ONE}: skipped"))
    assert f"patient '{ONE}'" in line and str(seg_path(cases[ONE])) in line
    for word in words:
        assert word in line, (word, line)
    assert [r.patient_id for r in load_strong_manifest(out)] == ["ABD_LYMPH_002"]


@pytest.mark.parametrize("case_name", ["empty", "not_lymph_nodes"])
def test_seg_without_lymph_node_voxels_is_refused(tmp_path, case_name):
    cases = seg_tree(tmp_path / "dl")
    case = cases[ONE]
    if case_name == "empty":
        empty = np.zeros(case.mask.shape, np.uint8)
        write_seg(seg_path(case), case.series, empty, omit_empty_frames=False)
        words = ["holds no voxel of its lymph-node segment(s) (1 'lymph node')"]
    else:
        labels = (case.mask != 0).astype(np.uint8)
        labels[0, :4, :4] = 2
        segments = [segment(1, "liver", lymph=False), segment(2, "spleen", lymph=False)]
        write_seg(seg_path(case), case.series, labels, segments=segments)
        words = ["none of the DICOM SEG's 2 segments (1 'liver', 2 'spleen')"]
    with pytest.raises(InputError) as err:
        prepare_tcia(tmp_path / "dl", tmp_path / "strong.csv")
    assert f"'{ONE}'" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_other_segments_left_out_one_unnamed_segment_used(tmp_path):
    cases = seg_tree(tmp_path / "dl", patients=[ONE, "ABD_LYMPH_002"])
    one, two = cases[ONE], cases["ABD_LYMPH_002"]
    labels = (one.mask != 0).astype(np.uint8)
    labels[0, :4, :4] = 2  # a liver segment beside the nodes
    write_seg(seg_path(one), one.series, labels, segments=[segment(1), segment(2, "liver", False)])
    unnamed = [segment(1, "ROI", lymph=False)]
    write_seg(seg_path(two), two.series, (two.mask != 0).astype(np.uint8), segments=unnamed)
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    assert any(
        "segment(s) 2 'liver' are not lymph nodes: left out" in w
        for w in one_result(report).warnings
    )
    second = one_result(report, "ABD_LYMPH_002")
    assert any("only segment (1 'ROI') does not say lymph node" in w for w in second.warnings)
    np.testing.assert_array_equal(written_mask(out), one.mask != 0)
    np.testing.assert_array_equal(written_mask(out, "ABD_LYMPH_002"), two.mask != 0)


# --------------------------------------------------------------------------- overlaps


def test_overlapping_frames_and_segments(tmp_path):
    cases = seg_tree(tmp_path / "dl", patients=[ONE, "ABD_LYMPH_002"])
    # 1: a second frame of segment 1 on the first frame's slice: the union is used
    one = cases[ONE]
    extra = np.zeros((1, *one.mask.shape[1:]), np.uint8)
    extra[0, 0:3, 0:3] = 1

    def duplicate(ds: pydicom.Dataset) -> None:
        groups = list(ds.PerFrameFunctionalGroupsSequence)
        set_frames(ds, np.concatenate([frames(ds), extra]), [*groups, copy.deepcopy(groups[0])])

    rewrite(seg_path(one), duplicate)
    first = pydicom.dcmread(seg_path(one)).PerFrameFunctionalGroupsSequence[0]
    ref = first.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    k = [sop_uid(f) for f in one.series.files].index(ref)
    expected_one = (one.mask != 0).astype(np.uint8)
    expected_one[k, 0:3, 0:3] = 1
    # 2: segments 1 and 2 overlap on node 5's voxels: they keep segment 1
    two = cases["ABD_LYMPH_002"]
    both = np.stack([two.mask != 0, two.mask == 5], axis=-1).astype(np.uint8)
    segments = [segment(1, "lymph nodes"), segment(2, "lymph node 5")]
    write_seg(seg_path(two), two.series, both, segments=segments)
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    union = [w for w in one_result(report).warnings if "several frames of one segment" in w]
    assert union and "their union is used" in union[0]
    np.testing.assert_array_equal(written_mask(out), expected_one)
    n = int(np.count_nonzero(two.mask == 5))
    warning = f"{n} voxel(s) lie in more than one DICOM SEG segment"
    assert any(warning in w for w in one_result(report, "ABD_LYMPH_002").warnings)
    np.testing.assert_array_equal(written_mask(out, "ABD_LYMPH_002"), two.mask != 0)


# --------------------------------------------------------------------------- finding SEGs


def test_several_segs_one_per_series_or_refused(tmp_path):
    cases = seg_tree(tmp_path / "dl", patients=[ONE, "ABD_LYMPH_002"])
    # 1: a second SEG that references another series is ignored
    other = seg_path(cases[ONE]).parent.parent / "301.000000-Segmentation-5" / "1-1.dcm"
    other.parent.mkdir()
    shutil.copy(seg_path(cases[ONE]), other)

    def elsewhere(ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.3"
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.826.0.1.3680043.99.4"

    rewrite(other, elsewhere)
    # 2: two SEGs of the series: refused
    copy_two = seg_path(cases["ABD_LYMPH_002"]).parent.parent / "302.000000-Seg" / "1-1.dcm"
    copy_two.parent.mkdir()
    shutil.copy(seg_path(cases["ABD_LYMPH_002"]), copy_two)
    rewrite(copy_two, lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.826.0.1.3680043.99.5"))
    report = prepare_tcia(tmp_path / "dl", tmp_path / "strong.csv")
    first = one_result(report)
    assert first.status == "ok" and first.mask_source == str(seg_path(cases[ONE]))
    assert any(f"of other series ignored: {other}" in w for w in first.warnings)
    problem = one_result(report, "ABD_LYMPH_002").problem
    assert "2 DICOM SEG files found for series" in problem and "keep one" in problem


def test_seg_without_its_ct_and_missing_seg_folder(tmp_path):
    cases = seg_tree(tmp_path / "dl", patients=[ONE, "ABD_LYMPH_002", "ABD_LYMPH_003"])
    shutil.rmtree(cases[ONE].series.folder)  # only the SEG series downloaded
    shutil.rmtree(seg_path(cases["ABD_LYMPH_002"]).parent)  # the SEG series missing
    report = prepare_tcia(tmp_path / "dl", tmp_path / "strong.csv")
    problem = one_result(report).problem
    assert "only DICOM SEG file(s)" in problem and "the CT series is missing" in problem
    two = one_result(report, "ABD_LYMPH_002").problem
    assert "lists DICOM SEG series" in two and "folder is missing" in two
    assert "no mask (ABD_LYMPH_002_mask.nii.gz" in two and "or a DICOM SEG series" in two


def test_prepare_tcia_end_to_end_on_a_seg_tree(tmp_path):
    ids = [ONE, "ABD_LYMPH_002", "MED_LYMPH_001"]
    cases = seg_tree(tmp_path / "dl", patients=ids)
    out = tmp_path / "data" / "strong.csv"
    result = runner.invoke(
        app, ["prepare-tcia", "--root", str(tmp_path / "dl"), "--out", str(out), "--region", "all"]
    )
    assert result.exit_code == 0, result.output
    assert "3 patient(s) written" in result.output
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["mask"] for r in rows] == [f"tcia_masks/{p}.nii.gz" for p in ids]
    for patient in ids:
        np.testing.assert_array_equal(written_mask(out, patient), cases[patient].mask != 0)
    saved = json.loads(report_path(out).read_text())
    assert all(
        p["mask_source"].endswith("300.000000-Segmentation-91234/1-1.dcm")
        for p in saved["patients"]
    )


def test_a_seg_beside_its_ct_is_not_a_second_image_series(tmp_path):
    """predict/train on a folder holding a CT series and its SEG read the CT (the SEG is
    an annotation, not an image series to choose between)."""
    cases = make_tcia_tree(tmp_path / "dl", layout="flat", patients=[ONE])
    case = cases[ONE]
    before = read_volume(case.series.folder, ONE)
    write_seg(case.series.folder / "seg.dcm", case.series, (case.mask != 0).astype(np.uint8))
    after = read_volume(case.series.folder, ONE)
    np.testing.assert_array_equal(after.array, before.array)
    assert after.geometry == before.geometry
