"""Volume I/O: round-trips with geometry, DICOM series in HU, and clear errors on bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.io.geometry import Geometry
from lymphdx.io.volumes import (
    dicom_series_ids,
    read_image,
    read_mask,
    read_volume,
    write_volume,
)
from tests.helpers import OBLIQUE_DIRECTION, make_dicom_series

SHAPE = (4, 6, 8)  # (z, y, x): unequal, so a transposed axis would show
GEOMETRY = Geometry(
    spacing=(0.7, 0.8, 2.5), origin=(-12.5, 30.25, 101.0), direction=OBLIQUE_DIRECTION
)


def ramp(dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=SHAPE) * 300 - 200).astype(dtype)


def assert_message(err: pytest.ExceptionInfo, path, patient: str, *words: str) -> None:
    """The error names the file, the patient and the problem."""
    message = str(err.value)
    assert str(path) in message, message
    assert repr(patient) in message, message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_round_trip_keeps_array_and_geometry(tmp_path, suffix, dtype):
    array = ramp(dtype)
    path = write_volume(tmp_path / f"scan{suffix}", array, GEOMETRY)
    volume = read_volume(path, "P1")
    assert volume.array.dtype == np.float32
    assert volume.array.shape == SHAPE
    np.testing.assert_array_equal(volume.array, array.astype(np.float32))
    assert volume.geometry.close_to(GEOMETRY), volume.geometry
    assert volume.shape_xyz == (8, 6, 4)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_header_names_its_final_data_file(tmp_path, suffix):
    array = ramp()
    path = write_volume(tmp_path / "a" / f"scan{suffix}", array, GEOMETRY)
    names = sorted(p.name for p in path.parent.iterdir())
    assert len(names) == 2 and all(n.startswith("scan.") for n in names), names
    # The header refers to its data file by a relative name: the pair can move.
    moved = tmp_path / "b"
    path.parent.rename(moved)
    np.testing.assert_array_equal(read_volume(moved / path.name).array, array)
    # Overwriting in place works too.
    write_volume(moved / path.name, array + 1, GEOMETRY)
    np.testing.assert_array_equal(read_volume(moved / path.name).array, array + 1)
    assert len(list(moved.iterdir())) == 2


def test_nibabel_reads_our_nifti_in_ras(tmp_path):
    path = write_volume(tmp_path / "scan.nii.gz", ramp(), GEOMETRY)
    image = nib.load(path)
    np.testing.assert_allclose(image.affine, GEOMETRY.affine_ras(), atol=1e-4)
    np.testing.assert_allclose(image.header.get_zooms()[:3], GEOMETRY.spacing, rtol=1e-6)
    # nibabel's array is (x, y, z); ours is (z, y, x).
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), ramp())


def test_mask_is_binarised_on_the_image_grid(tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 2:4, 3:5] = 1
    mask[2, 1, 1] = 7  # a second node, instance id 7
    path = write_volume(tmp_path / "mask.nii.gz", mask, GEOMETRY)
    volume = read_mask(path, GEOMETRY, SHAPE, "P1")
    assert volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, (mask != 0).astype(np.uint8))
    assert volume.geometry == GEOMETRY


def test_single_time_point_4d_is_a_volume(tmp_path):
    image = sitk.JoinSeries([GEOMETRY.apply(sitk.GetImageFromArray(ramp()))])
    path = tmp_path / "t1.nii.gz"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path, "P1")
    np.testing.assert_array_equal(volume.array, ramp())


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_reads_in_hu_sorted_by_position(tmp_path):
    spacing, origin = (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0)
    folder, stored, uid = make_dicom_series(
        tmp_path / "ct", shape=SHAPE, spacing=spacing, origin=origin, intercept=-1024
    )
    assert dicom_series_ids(folder) == [uid]
    # The file names are not in slice order (so a reader must sort by position).
    assert len(list(folder.iterdir())) == SHAPE[0]
    volume = read_volume(folder, "P7")
    assert volume.array.shape == SHAPE
    np.testing.assert_array_equal(volume.array, stored.astype(np.float32) - 1024)
    assert volume.array[0, 0, 0] == -1024  # stored value 0
    np.testing.assert_allclose(volume.geometry.spacing, spacing, rtol=1e-5)
    np.testing.assert_allclose(volume.geometry.origin, origin, atol=1e-4)
    np.testing.assert_allclose(volume.geometry.direction, np.eye(3).ravel(), atol=1e-6)


def test_dicom_rescale_slope_is_applied(tmp_path):
    stored = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) - 50
    folder, _, _ = make_dicom_series(
        tmp_path / "ct", shape=SHAPE, stored=stored, slope=2.5, intercept=-1000.0
    )
    volume = read_volume(folder, "P7")
    np.testing.assert_allclose(volume.array, stored * 2.5 - 1000.0)


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "does not exist")


def test_random_bytes_named_nifti(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "cannot read")


def test_random_bytes_inside_gzip(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(np.random.default_rng(1).bytes(3000)))
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "cannot read")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file(tmp_path, suffix, keep):
    good = write_volume(tmp_path / f"good{suffix}", ramp(), GEOMETRY)
    data = good.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1")
    assert any(w in str(err.value) for w in ("truncated", "cannot read")), str(err.value)


def test_nifti2_is_refused_clearly(tmp_path):
    path = tmp_path / "n2.nii"
    nib.save(nib.Nifti2Image(np.zeros((8, 6, 4), np.int16), np.eye(4)), path)
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "NIfTI-2")


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 8), np.float32)), str(path))
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "2-D")


def test_single_slice_3d_image(tmp_path):
    path = write_volume(tmp_path / "slice.nii.gz", np.zeros((1, 6, 8), np.float32), GEOMETRY)
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "single slice")


def test_4d_image_with_several_time_points(tmp_path):
    frame = GEOMETRY.apply(sitk.GetImageFromArray(ramp()))
    path = tmp_path / "dyn.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([frame, frame, frame]), str(path))
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "4-D", "3-D")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad, suffix):
    # ITK's NIfTI reader would silently turn these into 0; lymphdx must refuse them.
    array = ramp()
    array[1, 2, 3] = bad
    array[2, 2, 3] = bad
    path = write_volume(tmp_path / f"bad{suffix}", array, GEOMETRY)
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "2 voxels are NaN or infinite")


@pytest.mark.parametrize("dtype", [">f8", ">f4", "<f8"])
def test_non_finite_voxels_in_other_nifti_float_layouts(tmp_path, dtype):
    array = np.ones((8, 6, 4), dtype)
    array[1, 2, 3] = np.nan
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(InputError) as err:
        read_volume(path, "P1")
    assert_message(err, path, "P1", "1 voxels are NaN or infinite")


def test_mask_size_differs(tmp_path):
    path = write_volume(tmp_path / "mask.nii.gz", np.zeros((4, 6, 7), np.uint8), GEOMETRY)
    with pytest.raises(InputError) as err:
        read_mask(path, GEOMETRY, SHAPE, "P1")
    assert_message(err, path, "P1", "mask size (7, 6, 4)", "(8, 6, 4)")


@pytest.mark.parametrize(
    "other",
    [
        Geometry(GEOMETRY.spacing, (-12.5, 30.25, 111.0), GEOMETRY.direction),
        Geometry((0.7, 0.8, 3.0), GEOMETRY.origin, GEOMETRY.direction),
        Geometry(GEOMETRY.spacing, GEOMETRY.origin),
    ],
    ids=["origin", "spacing", "direction"],
)
def test_mask_geometry_differs(tmp_path, other):
    path = write_volume(tmp_path / "mask.nii.gz", np.zeros(SHAPE, np.uint8), other)
    with pytest.raises(InputError) as err:
        read_mask(path, GEOMETRY, SHAPE, "P1")
    assert_message(err, path, "P1", "mask geometry differs")


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a scan")
    with pytest.raises(InputError) as err:
        read_volume(folder, "P1")
    assert_message(err, folder, "P1", "no DICOM series")


def test_folder_with_two_series(tmp_path):
    folder = tmp_path / "two"
    _, _, uid1 = make_dicom_series(folder, shape=(3, 4, 4), series_uid="1.2.826.0.1.3680043.1.1")
    _, _, uid2 = make_dicom_series(
        folder, shape=(3, 4, 4), series_uid="1.2.826.0.1.3680043.1.2", shuffle_seed=1
    )
    assert len(list(folder.iterdir())) == 6
    with pytest.raises(InputError) as err:
        read_image(folder, "P1")
    assert_message(err, folder, "P1", "2 DICOM series", uid1, uid2)


def test_gzip_data_named_nii_says_to_rename(tmp_path) -> None:
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "a.nii.gz")
    )
    (tmp_path / "b.nii").write_bytes((tmp_path / "a.nii.gz").read_bytes())
    with pytest.raises(InputError, match=r"b\.nii.*gzip-compressed.*rename"):
        read_volume(tmp_path / "b.nii", "P1")


def test_symlink_loop_and_dangling_link_are_named_as_such(tmp_path) -> None:
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="loop of symbolic links"):
        read_volume(tmp_path / "loop1", "P1")
    with pytest.raises(InputError, match="symbolic link to .*missing.nii.gz.*which does not exist"):
        read_volume(tmp_path / "dangling.nii.gz", "P1")
