"""Where a NIfTI scan lies: lymphdx's geometry is nibabel's best affine (sform, else qform,
else pixdim only), for every qform/sform code combination it accepts, with negative
pixdim, qfac -1, flipped and permuted axes; outputs written on that geometry (as
``predict`` writes ``roi_prob``/``roi_mask``) lie on the input's voxels, not their mirror.

Every file is written with nibabel, and every check is against nibabel's reading of it
(``img.affine``, the NIfTI standard's choice), never against lymphdx's own.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lymphdx.core.config import DataConfig
from lymphdx.core.errors import InputError
from lymphdx.data.grid import canonical_grid, resample_mask, to_original
from lymphdx.io.geometry import Geometry, to_sitk
from lymphdx.io.volumes import read_image, read_mask, read_volume, write_volume

SHAPE_IJK = (9, 8, 6)  # nibabel's (i, j, k); lymphdx's arrays are (k, j, i)
MARK = (6, 2, 3)  # an off-centre voxel: a mirrored axis moves it
PATIENT = "P9"


def _affine(matrix, offset) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = matrix
    a[:3, 3] = offset
    return a


def _rotation(ax: float, az: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx


ZOOMS = np.diag([0.7, 0.8, 2.5])
AFFINES = {  # RAS affines, as nibabel writes them
    "ras": _affine(ZOOMS, [10.0, -20.0, 30.0]),
    "lps_like_dicom": _affine(np.diag([-0.7, -0.8, 2.5]), [120.0, 140.0, -300.0]),
    "oblique": _affine(_rotation(0.35, 0.5) @ ZOOMS, [-5.0, 7.5, 12.0]),
    "left_handed": _affine(_rotation(0.2, -0.4) @ np.diag([0.7, 0.8, -2.5]), [3.0, 4.0, 5.0]),
    "permuted_flipped": _affine([[0, 0, -2.5], [-0.7, 0, 0], [0, 0.8, 0]], [40.0, 50.0, -60.0]),
}


def marked() -> np.ndarray:
    """(i, j, k) int16 volume: a gradient (so no two voxels are alike) and one bright voxel."""
    data = np.arange(np.prod(SHAPE_IJK), dtype=np.int16).reshape(SHAPE_IJK) % 97 - 500
    data[MARK] = 1000
    return data


def write_nifti(
    path: Path,
    qform: tuple[np.ndarray, int] | None,
    sform: tuple[np.ndarray, int] | None,
    pixdim: tuple[float, float, float] | None = None,
    qfac: float | None = None,
    units: int | None = None,
    data: np.ndarray | None = None,
) -> Path:
    """A NIfTI written by nibabel with exactly these transforms and codes (None: code 0)."""
    cls = nib.Nifti1Pair if path.name.endswith((".hdr", ".img")) else nib.Nifti1Image
    image = cls(marked() if data is None else data, None)
    header = image.header
    header.set_qform(*(qform if qform is not None else (None, 0)))
    header.set_sform(*(sform if sform is not None else (None, 0)))
    if pixdim is not None:
        header["pixdim"][1:4] = pixdim
    if qfac is not None:
        header["pixdim"][0] = qfac
    if units is not None:
        header["xyzt_units"] = units
    nib.save(image, path)
    return path


def nibabel_affine(path: Path) -> np.ndarray:
    """nibabel's best affine (RAS) of ``path``, as it loads it."""
    with np.errstate(all="ignore"):
        return nib.load(path).affine


def world_of(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


def assert_same_place(path: Path, geometry: Geometry, array_kji: np.ndarray) -> None:
    """lymphdx's geometry is nibabel's affine, and the marked voxel lies at the same index
    and the same world position for both."""
    affine = nibabel_affine(path)
    np.testing.assert_allclose(geometry.affine_ras(), affine, atol=1e-4)
    (kji,) = np.argwhere(array_kji == array_kji.max())
    ijk = tuple(int(v) for v in kji[::-1])
    assert ijk == MARK
    np.testing.assert_allclose(
        world_of(geometry.affine_ras(), ijk), world_of(affine, MARK), atol=1e-4
    )


# Code combinations: both forms the same grid, every code 0..4 each (sform 0 with qform 0
# is the pixdim-only fallback, checked separately below).
CODES = [(q, s) for q, s in itertools.product([0, 1, 2], [0, 1, 2, 3, 4]) if (q, s) != (0, 0)]


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize(("qcode", "scode"), CODES)
def test_geometry_is_nibabels_affine_for_every_code_combination(tmp_path, name, qcode, scode):
    affine = AFFINES[name]
    path = write_nifti(tmp_path / "scan.nii.gz", (affine, qcode), (affine, scode))
    volume = read_volume(path, PATIENT)
    assert_same_place(path, volume.geometry, volume.array)
    # SimpleITK's own index-to-world transform of the image lymphdx hands on agrees.
    image = read_image(path, PATIENT)
    lps = np.asarray(image.TransformIndexToPhysicalPoint(MARK))
    np.testing.assert_allclose(lps * [-1, -1, 1], world_of(affine, MARK), atol=1e-4)


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize(
    ("qcode", "scode", "pixdim"),
    [
        (0, 2, (-0.7, 0.8, 2.5)),  # the issue: pixdim[1] < 0, a valid sform (nibabel's codes)
        (0, 1, (0.7, -0.8, -2.5)),
        (1, 1, (-0.7, 0.8, 2.5)),  # the qform agrees once pixdim's sign is dropped
        (2, 4, (-0.7, -0.8, -2.5)),
        (0, 1, (1.0, 1.0, 1.0)),  # ITK would take these voxel sizes (a warning only)
        (0, 3, (0.0, 0.0, 0.0)),  # ITK would read 1 mm
    ],
)
def test_pixdim_disagreeing_with_the_sform_is_ignored_as_the_standard_says(
    tmp_path, name, qcode, scode, pixdim
):
    base = AFFINES[name]
    # the sform of the grid whose voxel sizes are |pixdim|, so that the qform (which takes
    # them from pixdim) agrees with it
    sizes = np.where(np.asarray(pixdim) != 0, np.abs(pixdim), 1.0)
    columns = base[:3, :3] / np.linalg.norm(base[:3, :3], axis=0)
    affine = base if qcode == 0 else _affine(columns * sizes, base[:3, 3])
    path = write_nifti(tmp_path / "scan.nii.gz", (affine, qcode), (affine, scode), pixdim)
    volume = read_volume(path, PATIENT)
    assert_same_place(path, volume.geometry, volume.array)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_qform_alone_with_qfac_minus_one_and_flipped_axes(tmp_path, name):
    affine = AFFINES[name]
    path = write_nifti(tmp_path / "scan.nii", (affine, 1), None)
    header = nib.load(path).header
    assert header["pixdim"][0] == (-1 if np.linalg.det(affine[:3, :3]) < 0 else 1)
    volume = read_volume(path, PATIENT)
    assert_same_place(path, volume.geometry, volume.array)


RIGHT_HANDED = sorted(n for n, a in AFFINES.items() if np.linalg.det(a[:3, :3]) > 0)


@pytest.mark.parametrize("name", RIGHT_HANDED)  # qfac 0 means +1: a right-handed qform
def test_qform_alone_with_qfac_zero_counts_as_one(tmp_path, name):
    affine = AFFINES[name]
    path = write_nifti(tmp_path / "scan.nii", (affine, 1), None, qfac=0.0)
    volume = read_volume(path, PATIENT)
    assert_same_place(path, volume.geometry, volume.array)


def test_neither_form_is_placed_as_nibabel_places_it_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lymphdx")
    path = write_nifti(tmp_path / "scan.nii.gz", None, None, pixdim=(0.7, -0.8, 2.5))
    volume = read_volume(path, PATIENT)
    assert_same_place(path, volume.geometry, volume.array)
    # by hand: x flipped, centred on the volume, |pixdim| (nibabel.affines.shape_zoom_affine)
    expected = np.diag([-0.7, 0.8, 2.5, 1.0])
    expected[:3, 3] = [0.7 * 4, -0.8 * 3.5, -2.5 * 2.5]
    np.testing.assert_allclose(volume.geometry.affine_ras(), expected, atol=1e-5)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in message and repr(PATIENT) in message and "neither qform" in message


def test_sform_scale_warning_names_file_patient_and_fields(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lymphdx")
    affine = AFFINES["ras"]
    path = write_nifti(tmp_path / "scan.nii.gz", None, (affine, 2), pixdim=(-0.7, 0.8, 2.5))
    read_volume(path, PATIENT)
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for word in (str(path), repr(PATIENT), "pixdim[1:4] = (-0.7, 0.8, 2.5)", "sform is used"):
        assert word in message, message


def test_the_issues_file_read_by_simpleitk_alone_is_mirrored(tmp_path):
    """Why lymphdx sets the geometry itself: SimpleITK mirrors this file's x axis."""
    affine = AFFINES["ras"]
    path = write_nifti(tmp_path / "scan.nii", None, (affine, 2), pixdim=(-0.7, 0.8, 2.5))
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        itk = Geometry.of(sitk.ReadImage(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
    flipped = nibabel_affine(path) @ np.diag([-1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(itk.affine_ras(), flipped, atol=1e-4)  # ITK 5.4's reading
    np.testing.assert_allclose(
        read_volume(path).geometry.affine_ras(), nibabel_affine(path), atol=1e-4
    )


@pytest.mark.parametrize("suffix", [".hdr", ".img"])
def test_nifti_pair_is_placed_by_its_header_too(tmp_path, suffix):
    affine = AFFINES["oblique"]
    write_nifti(tmp_path / "scan.hdr", None, (affine, 1), pixdim=(-0.7, 0.8, 2.5))
    volume = read_volume(tmp_path / f"scan{suffix}", PATIENT)
    assert_same_place(tmp_path / "scan.hdr", volume.geometry, volume.array)


# --------------------------------------------------------------------------- outputs


ACCEPTED = [
    ("sform_negative_pixdim", dict(qform=None, sform=2, pixdim=(-0.7, 0.8, 2.5))),
    ("both_scanner", dict(qform=1, sform=1)),
    ("qform_only", dict(qform=1, sform=None)),
    ("sform_only_mni", dict(qform=None, sform=4)),
    ("qform_aligned_sform_talairach", dict(qform=2, sform=3, pixdim=(-0.7, -0.8, 2.5))),
    ("neither", dict(qform=None, sform=None)),
]


def _write_case(path: Path, affine: np.ndarray, case: dict) -> Path:
    q, s = case["qform"], case["sform"]
    return write_nifti(
        path,
        None if q is None else (affine, q),
        None if s is None else (affine, s),
        pixdim=case.get("pixdim"),
    )


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize(("label", "case"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_outputs_written_like_predicts_lie_on_the_inputs_voxels(tmp_path, name, label, case):
    """Read, resample onto the canonical grid and back (``to_original``, nearest), write
    with lymphdx's writer on the read geometry: nibabel finds the output's affine equal
    to the input's and the marked voxel at the same index and world position."""
    path = _write_case(tmp_path / "scan.nii.gz", AFFINES[name], case)
    volume = read_volume(path, PATIENT)
    original = to_sitk(volume.array, volume.geometry)
    cfg = DataConfig(spacing=(0.25, 0.25, 0.25), shape=(96, 96, 96))
    grid = canonical_grid(volume.geometry, volume.shape_xyz, cfg)
    mark = to_sitk((volume.array == volume.array.max()).astype(np.uint8), volume.geometry)
    on_grid = resample_mask(mark, grid)
    assert on_grid.any()
    back = sitk.GetArrayFromImage(to_original(on_grid, grid, original, nearest=True))
    out = write_volume(tmp_path / "roi_mask.nii.gz", back, volume.geometry)

    written = nib.load(out)
    np.testing.assert_allclose(written.affine, nibabel_affine(path), atol=1e-4)
    data = np.asarray(written.dataobj)
    assert data[MARK] == 1  # on the input's voxel, not its mirror
    centre = np.argwhere(data == 1).mean(axis=0)
    np.testing.assert_allclose(
        world_of(written.affine, centre), world_of(nibabel_affine(path), MARK), atol=0.5
    )
    # The output, read back by lymphdx, is placed where nibabel places it.
    assert read_volume(out).geometry.close_to(volume.geometry, tol=1e-4)


def test_mask_with_a_negative_pixdim_matches_its_clean_image(tmp_path):
    """The same grid, one header with pixdim[1] < 0: the mask is on its image's grid."""
    affine = AFFINES["lps_like_dicom"]
    image = write_nifti(tmp_path / "ct.nii.gz", (affine, 1), (affine, 1))
    mask_data = (marked() == 1000).astype(np.uint8)
    mask = write_nifti(
        tmp_path / "mask.nii.gz", None, (affine, 2), pixdim=(-0.7, 0.8, 2.5), data=mask_data
    )
    volume = read_volume(image, PATIENT)
    read = read_mask(mask, volume.geometry, volume.array.shape, PATIENT)
    assert read.array.transpose(2, 1, 0)[MARK] == 1 and read.array.sum() == 1


# --------------------------------------------------------------------------- refusals


def _shear() -> np.ndarray:
    a = AFFINES["ras"].copy()
    a[0, 2] = 2.5 * math.tan(math.radians(15))  # a 15-degree gantry tilt kept in the sform
    return a


def _other() -> np.ndarray:
    return AFFINES["ras"] @ np.diag([-1.0, 1.0, 1.0, 1.0])  # x mirrored


REFUSED = [
    (
        "qform_and_sform_disagree",
        dict(qform=(_other(), 1), sform=(AFFINES["ras"], 1)),
        ("qform (qform_code 1 (scanner))", "sform (sform_code 1 (scanner))", "apart",
         "set_qform"),
    ),
    (
        "aligned_sform_far_from_scanner_qform",
        dict(qform=(AFFINES["ras"], 1), sform=(AFFINES["oblique"], 2)),
        ("place the scan differently", "sform_code 2 (aligned)"),
    ),
    (
        "qform_voxel_size_differs_from_sform",
        dict(qform=(AFFINES["ras"], 1), sform=(AFFINES["ras"], 1), pixdim=(1.0, 1.0, 1.0)),
        ("place the scan differently", "pixdim[1:4] = (1, 1, 1)"),
    ),
    (
        "sheared_sform",
        dict(qform=None, sform=(_shear(), 1)),
        ("shears the grid", "i and k meet at 75.00 degrees", "DICOM series"),
    ),
    (
        "qform_only_negative_pixdim",
        dict(qform=(AFFINES["ras"], 1), sform=None, pixdim=(-0.7, 0.8, 2.5)),
        ("negative voxel size", "pixdim[1:4] = (-0.7, 0.8, 2.5)", "qform_code 1"),
    ),
    (
        "qfac_not_one",
        dict(qform=(AFFINES["ras"], 1), sform=None, qfac=-0.5),
        ("qfac (pixdim[0]) is -0.5",),
    ),
    (
        "zero_pixdim_with_qform",
        dict(qform=(AFFINES["ras"], 1), sform=(AFFINES["ras"], 1), pixdim=(0.7, 0.0, 2.5)),
        ("corrupt NIfTI header", "voxel size", "qform"),
    ),
    (
        "micrometres",
        dict(qform=None, sform=(AFFINES["ras"], 1), units=3 | 8),
        ("xyzt_units", "micrometres", "millimetres"),
    ),
    (
        "metres",
        dict(qform=(AFFINES["ras"], 1), sform=None, units=1),
        ("xyzt_units", "metres"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("label", "fields", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_header_contradictions_are_refused_naming_the_fields(tmp_path, label, fields, words):
    path = write_nifti(tmp_path / "scan.nii.gz", **fields)
    with pytest.raises(InputError) as err:
        read_volume(path, PATIENT)
    message = str(err.value)
    assert str(path) in message and repr(PATIENT) in message, message
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message


def _patch(path: Path, offset: int, fmt: str, *values) -> Path:
    import struct

    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, *values)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("offset", "fmt", "values", "words"),
    [
        (256, "3f", (0.8, 0.6, 0.5), ("quaternion", "longer than 1")),  # qform only
        (254, "h", (7,), ("sform_code is 7", "not a NIfTI transform code")),
        (252, "h", (-1,), ("qform_code is -1",)),
    ],
)
def test_corrupt_transform_fields_are_refused(tmp_path, offset, fmt, values, words):
    path = write_nifti(tmp_path / "scan.nii", (AFFINES["oblique"], 1), None)
    _patch(path, offset, fmt, *values)
    with pytest.raises(InputError) as err:
        read_volume(path, PATIENT)
    for word in (str(path), repr(PATIENT), *words):
        assert word in str(err.value), (word, str(err.value))


# --------------------------------------------------------------------------- NRRD, MHA


def test_metaimage_negative_spacing_places_voxels_where_the_header_says(tmp_path):
    """MetaImage's position of index v is Offset + TransformMatrix · (ElementSpacing ⊙ v):
    a negative spacing is an axis flip, which SimpleITK keeps (positive spacing, flipped
    direction): the same world positions."""
    data = np.zeros((4, 5, 6), np.int16)
    text = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 0 1 0 1 0 0 0 0 1\nOffset = 10 20 30\nElementSpacing = -4 3 2\n"
        "DimSize = 6 5 4\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path = tmp_path / "scan.mha"
    path.write_bytes(text.encode() + data.tobytes())
    geometry = read_volume(path, PATIENT).geometry
    matrix = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])  # MetaIO: row-major, columns = axes
    for index in itertools.product(range(0, 6, 5), range(0, 5, 4), range(0, 4, 3)):
        expected = np.array([10, 20, 30]) + matrix @ (np.array([-4, 3, 2]) * index)
        np.testing.assert_allclose(world_of(geometry.affine_lps(), index), expected)


def test_nrrd_negative_space_directions_in_ras_are_placed_in_lps(tmp_path):
    data = np.zeros((4, 5, 6), np.int16)
    text = (
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 6 5 4\nencoding: raw\nendian: little\n"
        "space: right-anterior-superior\nspace directions: (-4,0,0) (0,0,3) (0,-2,0)\n"
        "space origin: (10,20,30)\n\n"
    )
    path = tmp_path / "scan.nrrd"
    path.write_bytes(text.encode() + data.tobytes())
    geometry = read_volume(path, PATIENT).geometry
    directions = np.array([[-4, 0, 0], [0, 0, 3], [0, -2, 0.0]]).T  # columns = axes (RAS)
    for index in itertools.product(range(0, 6, 5), range(0, 5, 4), range(0, 4, 3)):
        ras = np.array([10, 20, 30]) + directions @ np.array(index, dtype=float)
        np.testing.assert_allclose(
            world_of(geometry.affine_lps(), index), ras * [-1, -1, 1], atol=1e-9
        )


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch supervised run on small phantoms (seconds)."""
    from lymphdx.engine.train import train
    from tests.conftest import tiny_config
    from tests.test_bad_input_data import dataset

    tmp = tmp_path_factory.mktemp("orientation_run")
    weak, strong = dataset(tmp)
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1, "device": "cpu"})
    train(config, tmp / "run", weak, strong, progress=False)
    return tmp / "run"


def test_predict_roi_maps_lie_on_the_inputs_voxels(run: Path, tmp_path: Path) -> None:
    """The issue's file (pixdim[1] = -4, a valid sform) and other accepted headers of the
    same voxels and grid: ``roi_prob``/``roi_mask`` carry the input's affine (nibabel), and
    equal the maps of the plainly written file voxel for voxel."""
    from lymphdx.workflows.predict import predict
    from tests.test_bad_input_data import ct_phantom

    hu = ct_phantom(11, (32, 64, 64))
    hu[12:20, 24:40, 6:20] = 45  # soft tissue on one side only: a mirror shows
    data = hu.transpose(2, 1, 0)  # (i, j, k)
    affine = _affine(np.diag([-4.0, -4.0, 6.0]), [128.0, 100.0, -90.0])
    scans = {
        "plain": write_nifti(tmp_path / "plain.nii.gz", (affine, 1), (affine, 1), data=data),
        "issue": write_nifti(
            tmp_path / "issue.nii.gz", None, (affine, 2), pixdim=(-4, 4, 6), data=data
        ),
        "qform": write_nifti(tmp_path / "qform.nii.gz", (affine, 1), None, data=data),
    }
    results = predict(run, list(scans.values()), tmp_path / "out")
    maps = {}
    for name in scans:
        for kind in ("roi_prob", "roi_mask"):
            written = nib.load(tmp_path / "out" / name / f"{kind}.nii.gz")
            np.testing.assert_allclose(written.affine, affine, atol=1e-4)
            maps[name, kind] = np.asarray(written.dataobj)
    for name in ("issue", "qform"):
        for kind in ("roi_prob", "roi_mask"):
            np.testing.assert_allclose(maps[name, kind], maps["plain", kind], atol=1e-6)
    probabilities = [r["probability"] for r in results]
    assert probabilities == pytest.approx([probabilities[0]] * 3, abs=1e-6)
