"""DICOM series reading on real exports' faults, built from pydicom's shipped DICOM files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.io.dicom import read_dicom_series
from lymphdx.io.volumes import read_image, read_volume
from tests.helpers import write_compressed_mr_series, write_ct_series

OBLIQUE = (
    float(np.cos(0.3)),
    float(np.sin(0.3)),
    0.0,
    float(-np.sin(0.3) * np.cos(0.2)),
    float(np.cos(0.3) * np.cos(0.2)),
    float(np.sin(0.2)),
)


def array_of(series) -> np.ndarray:
    return sitk.GetArrayFromImage(series.image)


def assert_names(err: pytest.ExceptionInfo, path, patient: str, *words: str) -> None:
    message = str(err.value)
    assert str(path) in message, message
    assert repr(patient) in message, message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------- order, HU


def test_slices_sorted_by_position_not_name_or_instance_number(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 6)
    by_name = sorted(ct.files, key=lambda p: p.name)
    assert by_name != ct.files  # file names are shuffled against the positions
    numbers = [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in ct.files]
    assert numbers != sorted(numbers)  # and so is InstanceNumber
    series = read_dicom_series(ct.folder, "P1")
    np.testing.assert_array_equal(array_of(series), ct.hu)
    np.testing.assert_allclose(series.image.GetOrigin(), ct.positions[0], atol=1e-4)
    np.testing.assert_allclose(series.image.GetSpacing(), (*ct.spacing_xy, 2.5), rtol=1e-5)
    assert series.report.warnings == [] and not series.report.resampled


def test_slices_sorted_along_the_normal_when_stored_descending(tmp_path):
    positions = [(-158.1, -179.0, -75.7 - 2.5 * k) for k in range(5)]  # feet-first export
    ct = write_ct_series(tmp_path / "ct", positions=positions)
    series = read_dicom_series(ct.folder)
    np.testing.assert_array_equal(array_of(series), ct.hu[::-1])
    np.testing.assert_allclose(series.image.GetOrigin(), positions[-1], atol=1e-4)


def test_rescale_slope_and_intercept_per_slice(tmp_path):
    slopes = [1.0, 2.0, 0.5, 1.5]
    ct = write_ct_series(tmp_path / "ct", slopes=slopes, intercept=-1000.0)
    series = read_dicom_series(ct.folder)
    np.testing.assert_allclose(array_of(series), ct.hu, atol=1e-3)
    assert array_of(series).min() < -800  # HU, not stored values


def test_io_reads_dicom_folders_through_the_reader(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 4)
    volume = read_volume(ct.folder, "P1")
    np.testing.assert_array_equal(volume.array, ct.hu)


# --------------------------------------------------------------------------- several series


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An axial CT (7 slices), a sagittal CT (9), a CT localizer (10) and an MR (12)."""
    folder = tmp_path / "mixed"
    axial = write_ct_series(folder, 7, name_prefix="a", series_number=3)
    sag = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    sagittal = write_ct_series(folder, 9, orientation=sag, name_prefix="s", series_number=4)
    scout = write_ct_series(
        folder,
        10,
        name_prefix="l",
        series_number=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    mr = write_ct_series(folder, 12, modality="MR", name_prefix="m", series_number=5)
    uids = {
        "axial": axial.series_uid,
        "sagittal": sagittal.series_uid,
        "scout": scout.series_uid,
        "mr": mr.series_uid,
    }
    return folder, uids


def test_several_series_are_refused_by_default(mixed_folder):
    folder, uids = mixed_folder
    with pytest.raises(InputError) as err:
        read_dicom_series(folder, "P1")
    assert_names(err, folder, "P1", "4 DICOM series", *uids.values())
    with pytest.raises(InputError) as err:
        read_image(folder, "P1")  # io refuses them too
    assert_names(err, folder, "P1", "4 DICOM series")


def test_several_series_choose_by_uid(mixed_folder):
    folder, uids = mixed_folder
    series = read_dicom_series(folder, "P1", series_uid=uids["sagittal"])
    assert series.report.series_uid == uids["sagittal"]
    assert "SeriesInstanceUID" in series.report.choice
    assert array_of(series).shape == (9, 128, 128)
    with pytest.raises(InputError) as err:
        read_dicom_series(folder, "P1", series_uid="1.2.3.4")
    assert_names(err, folder, "P1", "1.2.3.4 is not in the folder", uids["axial"])


def test_several_series_choose_by_rule_most_slices_of_an_axial_ct(mixed_folder, caplog):
    folder, uids = mixed_folder
    with caplog.at_level(logging.INFO, logger="lymphdx"):
        series = read_dicom_series(folder, "P1", pick_largest=True)
    assert series.report.series_uid == uids["axial"]  # not the bigger MR, sagittal or scout
    assert "most slices of an axial CT" in series.report.choice
    assert uids["axial"] in caplog.text
    assert "3 other series in the folder ignored" in series.report.notes


# --------------------------------------------------------------------------- gaps


def test_missing_slice_warns_with_the_gap_and_resamples(tmp_path, caplog):
    positions = [(-158.1, -179.0, -75.7 + 2.5 * k) for k in (0, 1, 2, 4, 5)]
    ct = write_ct_series(tmp_path / "ct", positions=positions)
    with caplog.at_level(logging.WARNING, logger="lymphdx"):
        series = read_dicom_series(ct.folder, "P1")
    gap = [w for w in series.report.warnings if w.startswith("gap of 5.00 mm")]
    assert gap and "about 1 slice(s) missing" in gap[0], series.report.warnings
    assert "gap of 5.00 mm" in caplog.text and "'P1'" in caplog.text
    assert series.report.resampled
    hu = array_of(series)
    assert hu.shape == (6, 128, 128)
    np.testing.assert_allclose(series.image.GetSpacing()[2], 2.5)
    for out, source in ((0, 0), (1, 1), (2, 2), (4, 3), (5, 4)):
        np.testing.assert_allclose(hu[out], ct.hu[source], atol=1e-3)
    np.testing.assert_allclose(hu[3], (ct.hu[2] + ct.hu[3]) / 2, atol=1e-3)  # interpolated


def test_uneven_spacing_warns_and_resamples(tmp_path):
    offsets = [0.0, 2.0, 4.5, 6.5, 9.0, 11.0]
    positions = [(-158.1, -179.0, -75.7 + z) for z in offsets]
    ct = write_ct_series(tmp_path / "ct", positions=positions)
    series = read_dicom_series(ct.folder)
    assert any(w.startswith("uneven slice spacing") for w in series.report.warnings)
    spacing = series.image.GetSpacing()[2]
    assert spacing == pytest.approx(2.0)
    hu = array_of(series)
    assert hu.shape[0] == 6  # 0, 2, ..., 10 mm (11 mm is the last input)
    np.testing.assert_allclose(hu[1], ct.hu[1], atol=1e-3)  # 2 mm: an input slice
    np.testing.assert_allclose(hu[2], 0.8 * ct.hu[2] + 0.2 * ct.hu[1], atol=1e-2)  # 4 mm


def test_duplicate_slice_files_are_dropped(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 4)
    shutil.copy(ct.files[0], ct.folder / "copy-of-first.dcm")
    series = read_dicom_series(ct.folder)
    np.testing.assert_array_equal(array_of(series), ct.hu)
    assert any("same SOPInstanceUID" in w for w in series.report.warnings)


def test_two_different_slices_at_one_position_are_refused(tmp_path):
    positions = [(0.0, 0.0, 2.5 * k) for k in (0, 1, 1, 2)]
    ct = write_ct_series(tmp_path / "ct", positions=positions)
    with pytest.raises(InputError) as err:
        read_dicom_series(ct.folder, "P1")
    assert_names(err, ct.folder, "P1", "same position")


# --------------------------------------------------------------------------- tilt, oblique


def test_oblique_stack_is_read_exactly_with_its_direction(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 5, orientation=OBLIQUE)
    series = read_dicom_series(ct.folder)
    assert not series.report.resampled
    assert any("oblique" in n for n in series.report.notes)
    np.testing.assert_array_equal(array_of(series), ct.hu)
    direction = np.asarray(series.image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], OBLIQUE[:3], atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], OBLIQUE[3:], atol=1e-6)
    np.testing.assert_allclose(direction[:, 2], ct.normal, atol=1e-6)


def tilted_series(tmp_path: Path, degrees: float = 15.0):
    """Gantry tilt: slices tilted about x, but the table moves along z only."""
    t = np.radians(degrees)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))
    positions = [(-40.0, -40.0, 10.0 + 3.0 * k) for k in range(6)]
    return write_ct_series(
        tmp_path / "tilt", crop=(48, 40), orientation=orientation, positions=positions
    )


def test_gantry_tilt_is_resampled_onto_a_rectangular_grid(tmp_path, caplog):
    ct = tilted_series(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lymphdx"):
        series = read_dicom_series(ct.folder, "P1")
    assert series.report.tilt_degrees == pytest.approx(15.0, abs=0.01)
    assert series.report.resampled
    assert "gantry tilt of 15.0°" in caplog.text
    # Every output voxel holds the acquired stack's value at its world position: on an
    # acquired slice (the grid steps along the normal by the slice distance), bilinear
    # interpolation within it.
    from scipy.ndimage import map_coordinates

    o = np.asarray(ct.orientation)
    image, hu = series.image, array_of(series)
    assert hu.shape[0] == 6
    checked = 0
    for k in range(6):
        for j in range(0, hu.shape[1], 3):
            for i in range(0, hu.shape[2], 3):
                world = np.asarray(image.TransformIndexToPhysicalPoint((i, j, k)))
                rel = world - ct.positions[k]
                assert abs(rel @ ct.normal) < 1e-6  # on acquired slice k
                col, row = rel @ o[:3] / ct.spacing_xy[0], rel @ o[3:] / ct.spacing_xy[1]
                if not (-0.6 <= col <= 39.6 and -0.6 <= row <= 47.6):
                    assert hu[k, j, i] == pytest.approx(hu.min())  # outside: filled with air
                    continue
                if not (0 <= col <= 39 and 0 <= row <= 47):
                    continue  # within half a pixel of the edge
                want = map_coordinates(ct.hu[k], [[row], [col]], order=1)[0]
                assert hu[k, j, i] == pytest.approx(want, abs=0.05)
                checked += 1
    assert checked > 100
    # The output grid is rectangular: direction orthonormal, z along the slice normal.
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(direction[:, 2], ct.normal, atol=1e-9)


def test_gantry_tilt_can_be_refused(tmp_path):
    ct = tilted_series(tmp_path)
    with pytest.raises(InputError) as err:
        read_dicom_series(ct.folder, "P1", tilt="refuse")
    assert_names(err, ct.folder, "P1", "gantry tilt of 15.0°")


def test_positions_off_a_line_are_refused(tmp_path):
    positions = [(0.0, 0.0, 0.0), (0.0, 0.0, 2.5), (9.0, 0.0, 5.0), (0.0, 0.0, 7.5)]
    ct = write_ct_series(tmp_path / "ct", positions=positions)
    with pytest.raises(InputError) as err:
        read_dicom_series(ct.folder, "P1")
    assert_names(err, ct.folder, "P1", "one straight line")


def test_mixed_orientations_are_refused(tmp_path):
    folder = tmp_path / "ct"
    ct = write_ct_series(folder, 3)
    write_ct_series(
        folder, 2, orientation=OBLIQUE, series_uid=ct.series_uid, name_prefix="x", step=7.0
    )
    with pytest.raises(InputError) as err:
        read_dicom_series(folder, "P1")
    assert_names(err, folder, "P1", "different orientations")


# --------------------------------------------------------------------------- modality, codecs


def test_non_ct_is_refused_unless_forced(tmp_path):
    mr = write_ct_series(tmp_path / "mr", 3, modality="MR")
    with pytest.raises(InputError) as err:
        read_dicom_series(mr.folder, "P1")
    assert_names(err, mr.folder, "P1", "is MR, not CT")
    with pytest.raises(InputError):
        read_volume(mr.folder, "P1")
    series = read_dicom_series(mr.folder, "P1", allow_non_ct=True)
    assert series.report.modality == "MR"


def test_rle_compressed_ct(tmp_path):
    ct = write_ct_series(tmp_path / "rle", 4, compress="rle")
    series = read_dicom_series(ct.folder)
    assert series.report.transfer_syntaxes == ["RLE Lossless (1.2.840.10008.1.2.5)"]
    np.testing.assert_array_equal(array_of(series), ct.hu)


@pytest.mark.parametrize(
    "source", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"]
)
def test_compressed_series_the_installed_decoders_read(tmp_path, source):
    folder, expected = write_compressed_mr_series(tmp_path / "mr", source)
    series = read_dicom_series(folder, allow_non_ct=True)
    hu = array_of(series)
    assert hu.shape == (3, 64, 64)
    for plane in hu:
        np.testing.assert_array_equal(plane, expected)


def test_undecodable_transfer_syntax_is_refused_clearly(tmp_path):
    ct = write_ct_series(tmp_path / "htj2k", 3, compress="undecodable")
    with pytest.raises(InputError) as err:
        read_dicom_series(ct.folder, "P1")
    assert_names(err, ct.folder, "P1", "cannot decode", "High-Throughput JPEG 2000")


def test_non_dicom_files_are_ignored_and_counted(tmp_path):
    ct = write_ct_series(tmp_path / "ct", 3)
    (ct.folder / "LICENSE.txt").write_text("not a scan")
    series = read_dicom_series(ct.folder)
    assert "1 non-image or non-DICOM file(s) ignored" in series.report.notes


def test_folder_with_slices_in_subfolders_says_so(tmp_path):
    write_ct_series(tmp_path / "study" / "series", 3)
    with pytest.raises(InputError) as err:
        read_dicom_series(tmp_path / "study", "P1")
    assert_names(err, tmp_path / "study", "P1", "no DICOM series", "subfolders")


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch tiny multitask run (seconds)."""
    from lymphdx.engine.train import train
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("run")
    config = tiny_config(tmp, strategy="multitask", training={"epochs": 1})
    run = tmp / "run"
    train(
        config,
        run,
        tiny_data / "weak" / "manifest.csv",
        tiny_data / "strong" / "manifest.csv",
        progress=False,
    )
    return run


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_predict_on_dicom_writes_outputs_in_the_series_geometry(tiny_run, tmp_path, orientation):
    from lymphdx.workflows.predict import predict

    kw = {"orientation": OBLIQUE} if orientation == "oblique" else {}
    ct = write_ct_series(tmp_path / "scan", 7, step=3.0, **kw)
    results = predict(tiny_run, [ct.folder], tmp_path / "out")
    assert 0.0 <= results[0]["probability"] <= 1.0
    # Independent readers: pydicom on the input's headers, nibabel on the outputs.
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct.folder.iterdir()]
    o = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(o[:3], o[3:])
    positions = np.asarray([h.ImagePositionPatient for h in headers], dtype=float)
    positions = positions[np.argsort(positions @ normal)]
    row_spacing, col_spacing = (float(s) for s in headers[0].PixelSpacing)
    expected = np.eye(4)  # LPS affine of (x, y, z) indices
    expected[:3, 0] = o[:3] * col_spacing
    expected[:3, 1] = o[3:] * row_spacing
    expected[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected[:3, 3] = positions[0]
    for name in ("roi_prob.nii.gz", "roi_mask.nii.gz"):
        image = nib.load(tmp_path / "out" / "scan" / name)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
        np.testing.assert_allclose(lps, expected, atol=1e-3)
        assert image.shape == (128, 128, 7)
        np.testing.assert_allclose(
            image.header.get_zooms()[:3], (col_spacing, row_spacing, 3.0), rtol=1e-5
        )


# --------------------------------------------------------------------------- DICOM SEG


def _seg_frames(seg_path: Path, folder: Path) -> tuple[list[int], np.ndarray, pydicom.Dataset]:
    """The SEG's frames read back with pydicom: each frame's source slice (index in the
    series' order, from its referenced SOP Instance UID, its position checked against
    the source's) and the frames."""
    from lymphdx.io.dicom_seg import series_slices

    seg = pydicom.dcmread(seg_path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_slices(folder)[0]]
    index = {d.SOPInstanceUID: k for k, d in enumerate(sources)}
    order = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index[uid]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            np.asarray(position, float), np.asarray(sources[k].ImagePositionPatient, float)
        )
        order.append(k)
    return order, seg.pixel_array.reshape(len(order), *seg.pixel_array.shape[-2:]), seg


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_dicom_seg_references_the_series_and_holds_the_mask(tmp_path, orientation):
    from lymphdx.io.dicom_seg import series_slices, write_dicom_seg

    kw = {"orientation": OBLIQUE} if orientation == "oblique" else {}
    ct = write_ct_series(tmp_path / "ct", 6, step=3.0, **kw)
    volume = read_volume(ct.folder)
    mask = np.zeros(volume.array.shape, np.uint8)  # not symmetric in z, y or x
    mask[1, 40:60, 50:70] = 1
    mask[4, 10:20, 5:9] = 1
    assert write_dicom_seg(tmp_path / "seg.dcm", mask, ct.folder) is None
    order, frames, seg = _seg_frames(tmp_path / "seg.dcm", ct.folder)
    assert sorted(order) == list(range(6))  # one frame per source slice
    for k, frame in zip(order, frames, strict=True):
        np.testing.assert_array_equal(frame, mask[k])
    # the volume's slice k (where the mask was drawn) lies where the series' slice k does
    a = volume.geometry.affine_lps()
    files = series_slices(ct.folder)[0]
    for k, path in enumerate(files):
        position = pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient
        np.testing.assert_allclose(a[:3, 2] * k + a[:3, 3], np.asarray(position, float), atol=1e-3)
    source = pydicom.dcmread(files[0])
    refs = {
        r.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert len(refs) == 6 and source.SOPInstanceUID in refs
    for key in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID"):
        assert getattr(seg, key) == getattr(source, key), key
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.Modality == "SEG"
    (segment,) = seg.SegmentSequence
    code = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("59441001", "SCT")
    assert segment.SegmentLabel == "lymph node"


def test_predict_on_a_dicom_series_writes_a_seg_equal_to_the_nifti_mask(tiny_run, tmp_path):
    from lymphdx.workflows.predict import predict

    ct = write_ct_series(tmp_path / "scan", 7, step=3.0)
    (result,) = predict(tiny_run, [ct.folder], tmp_path / "out")
    folder = tmp_path / "out" / "scan"
    assert result["dicom_seg"] == "roi_seg.dcm" and result["dicom_seg_warning"] is None
    nifti = read_volume(folder / "roi_mask.nii.gz").array
    order, frames, _ = _seg_frames(folder / "roi_seg.dcm", ct.folder)
    for k, frame in zip(order, frames, strict=True):
        np.testing.assert_array_equal(frame, nifti[k] > 0)


def test_a_series_without_what_seg_needs_warns_and_keeps_the_nifti_outputs(
    tiny_run, tmp_path, caplog
):
    from lymphdx.workflows.predict import predict

    ct = write_ct_series(tmp_path / "scan", 7, step=3.0)
    for path in ct.folder.iterdir():  # an anonymiser that dropped the frame of reference
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    with caplog.at_level(logging.WARNING, logger="lymphdx"):
        (result,) = predict(tiny_run, [ct.folder], tmp_path / "out")
    folder = tmp_path / "out" / "scan"
    assert result["dicom_seg"] is None and "no DICOM SEG" in result["dicom_seg_warning"]
    assert "Frame Of Reference" in result["dicom_seg_warning"]
    assert any("no DICOM SEG" in r.getMessage() for r in caplog.records)
    names = sorted(p.name for p in folder.iterdir())
    assert "roi_seg.dcm" not in names and "roi_mask.nii.gz" in names
    assert not [p for p in (tmp_path / "out").rglob(".tmp-*")]
