"""Tests of lymphdx.data.preprocess: canonical grid, resampling, round trip, cache, z-score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lymphdx.core.config import DataConfig
from lymphdx.core.errors import InputError
from lymphdx.data import preprocess
from lymphdx.data.grid import (
    Grid,
    canonical_grid,
    resample_image,
    resample_labels,
    resample_mask,
    to_original,
)
from lymphdx.data.preprocess import (
    Normalizer,
    PreprocessCache,
    fit_normalizers,
    load_normalizers,
    save_normalizers,
    settings_key,
)
from lymphdx.io import volumes as io
from lymphdx.io.geometry import Geometry, to_sitk
from tests.helpers import OBLIQUE_DIRECTION, make_dicom_series

# Input: 20 x 16 x 12 voxels (x, y, z), anisotropic, off-origin, x and y flipped.
SIZE_XYZ = (20, 16, 12)
GEOM = Geometry((2.0, 1.5, 3.0), (10.0, -20.0, 5.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
CENTRE = np.array([-4.0, -34.0, 18.0])  # world (LPS, mm) centre of the bright sphere
RADIUS = 7.0
BG, BRIGHT = 0.0, 1000.0


def world_coords(geometry: Geometry, size_xyz) -> np.ndarray:
    """World (x, y, z) of every voxel centre, as a (z, y, x, 3) array."""
    x, y, z = size_xyz
    kk, jj, ii = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    idx = np.stack([ii, jj, kk, np.ones_like(ii)], axis=-1).astype(np.float64)
    return (idx @ geometry.affine_lps().T)[..., :3]


def sphere_mask(geometry=GEOM, size_xyz=SIZE_XYZ, centre=CENTRE, radius=RADIUS) -> np.ndarray:
    return np.linalg.norm(world_coords(geometry, size_xyz) - centre, axis=-1) <= radius


def phantom(geometry=GEOM, size_xyz=SIZE_XYZ) -> np.ndarray:
    """(z, y, x) float32: background 0 HU, sphere 1000 HU, one slice of -1000 HU (z = 0)."""
    array = np.full(tuple(reversed(size_xyz)), BG, dtype=np.float32)
    array[sphere_mask(geometry, size_xyz)] = BRIGHT
    array[0] = -1000.0
    return array


def centroid_xyz(array_zyx: np.ndarray) -> np.ndarray:
    z, y, x = np.nonzero(array_zyx)
    return np.array([x.mean(), y.mean(), z.mean()])


def expected_index(grid: Grid, world) -> np.ndarray:
    g = grid.geometry
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return (np.asarray(world) - np.asarray(g.origin)) / np.asarray(g.spacing)


CROP = DataConfig(spacing=(2.5, 2.0, 3.5), shape=(24, 20, 12), fit="crop")
RESIZE = DataConfig(shape=(16, 12, 10), fit="resize")


@pytest.mark.parametrize("cfg", [CROP, RESIZE], ids=["crop", "resize"])
def test_sphere_lands_at_world_position(cfg: DataConfig) -> None:
    image = to_sitk(phantom(), GEOM)
    grid = canonical_grid(GEOM, SIZE_XYZ, cfg)
    out = resample_image(image, grid, cfg)
    assert out.shape == tuple(reversed(cfg.shape)) and out.dtype == np.float32
    # Grid centred on the input's field of view.
    fov_centre = GEOM.affine_lps() @ np.r_[(np.array(SIZE_XYZ) - 1) / 2, 1.0]
    grid_centre = grid.geometry.affine_lps() @ np.r_[(np.array(cfg.shape) - 1) / 2, 1.0]
    np.testing.assert_allclose(grid_centre, fov_centre, atol=1e-9)
    if cfg.fit == "crop":
        assert grid.geometry.spacing == cfg.spacing
    else:  # extent (40, 24, 36) mm stretched onto the shape
        np.testing.assert_allclose(grid.geometry.spacing, np.array([40, 24, 36]) / cfg.shape)
    bright = out > (cfg.hu_window[1] / 2)
    np.testing.assert_allclose(centroid_xyz(bright), expected_index(grid, CENTRE), atol=0.35)
    # Clipping and padding.
    assert out.max() == pytest.approx(cfg.hu_window[1])
    assert out.min() == pytest.approx(cfg.hu_window[0])
    assert np.all((out >= cfg.hu_window[0]) & (out <= cfg.hu_window[1]))


@pytest.mark.parametrize("shape", [(24, 20, 12), (16, 10, 8)], ids=["pad", "crop"])
def test_crop_pads_with_window_low_and_keeps_background(shape) -> None:
    """(24, 20, 12) at (2.5, 2, 3.5) mm = 60 x 40 x 42 mm pads every axis of the 40 x 24 x
    36 mm input; (16, 10, 8) = 40 x 20 x 28 mm crops y and z."""
    cfg = CROP.model_copy(update={"shape": shape})
    grid = canonical_grid(GEOM, SIZE_XYZ, cfg)
    out = resample_image(to_sitk(phantom(), GEOM), grid, cfg)
    world = world_coords(grid.geometry, shape)
    index = (
        np.c_[world.reshape(-1, 3), np.ones(world[..., 0].size)]
        @ np.linalg.inv(GEOM.affine_lps()).T
    )
    index = index[:, :3].reshape(world.shape)
    size = np.array(SIZE_XYZ)
    outside = np.any((index < -0.5 - 1e-6) | (index > size - 0.5 + 1e-6), axis=-1)
    far = np.linalg.norm(world - CENTRE, axis=-1) > RADIUS + 4.0
    inside = np.all((index >= 0) & (index <= size - 1), axis=-1) & (index[..., 2] >= 1) & far
    assert inside.sum() > 50
    np.testing.assert_array_equal(out[outside], cfg.hu_window[0])
    np.testing.assert_allclose(out[inside], BG, atol=1e-4)
    assert outside.any() == (shape == (24, 20, 12))
    # The -1000 HU slice (input z = 0) is clipped to the window's low end (pad case), or
    # cropped away (crop case: 28 of 36 mm kept about the centre).
    assert out.min() == (cfg.hu_window[0] if outside.any() else BG)


def test_resize_identity_is_a_pure_reorientation() -> None:
    """Same voxel count as the input: the canonical grid is the input's voxel centres, with
    x and y flipped to the canonical (L, P) directions."""
    cfg = DataConfig(shape=SIZE_XYZ, fit="resize", hu_window=(-2000.0, 2000.0))
    array = phantom() + np.random.default_rng(0).normal(0, 10, size=(12, 16, 20)).astype("f4")
    out = resample_image(to_sitk(array, GEOM), canonical_grid(GEOM, SIZE_XYZ, cfg), cfg)
    np.testing.assert_allclose(out, array[:, ::-1, ::-1], atol=1e-3)


def test_resize_oblique_covers_bounding_box() -> None:
    geometry = Geometry((1.0, 1.0, 2.0), (5.0, 6.0, 7.0), OBLIQUE_DIRECTION)
    cfg = DataConfig(shape=(10, 10, 8), fit="resize")
    grid = canonical_grid(geometry, (10, 10, 8), cfg)
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, 9.5) for j in (-0.5, 9.5) for k in (-0.5, 7.5)]
    )
    world = (corners @ geometry.affine_lps().T)[:, :3]
    lo = np.asarray(grid.geometry.origin) - np.asarray(grid.geometry.spacing) / 2
    hi = lo + np.asarray(grid.geometry.spacing) * cfg.shape
    np.testing.assert_allclose(lo, world.min(axis=0), atol=1e-9)
    np.testing.assert_allclose(hi, world.max(axis=0), atol=1e-9)


def test_grid_dict_round_trip() -> None:
    grid = canonical_grid(GEOM, SIZE_XYZ, CROP)
    assert Grid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid
    assert grid.shape_zyx == (12, 20, 24)


@pytest.mark.parametrize("cfg", [CROP, RESIZE], ids=["crop", "resize"])
def test_mask_binarised_and_aligned(cfg: DataConfig) -> None:
    ids = np.zeros((12, 16, 20), dtype=np.uint8)
    ids[sphere_mask()] = 2
    ids[10:12, 2:4, 2:4] = 3
    ids[5, 14, 17:19] = 1
    grid = canonical_grid(GEOM, SIZE_XYZ, cfg)
    out = resample_mask(to_sitk(ids, GEOM), grid)
    assert out.dtype == np.uint8 and out.shape == grid.shape_zyx
    assert set(np.unique(out)) <= {0, 1}
    image = resample_image(to_sitk(phantom(), GEOM), grid, cfg)
    bright = image > cfg.hu_window[1] / 2
    only_sphere = resample_mask(to_sitk((ids == 2).astype(np.uint8), GEOM), grid)
    np.testing.assert_allclose(centroid_xyz(only_sphere), centroid_xyz(bright), atol=0.5)
    assert np.count_nonzero(out) > np.count_nonzero(only_sphere)


@pytest.mark.parametrize("cfg", [CROP, RESIZE], ids=["crop", "resize"])
def test_labels_keep_their_ids_where_the_mask_is(cfg: DataConfig) -> None:
    """resample_labels keeps each node's id, on exactly the voxels resample_mask marks."""
    ids = np.zeros((12, 16, 20), dtype=np.uint16)
    ids[sphere_mask()] = 7
    ids[10:12, 2:4, 2:4] = 300
    grid = canonical_grid(GEOM, SIZE_XYZ, cfg)
    labels = resample_labels(to_sitk(ids, GEOM), grid)
    assert labels.dtype == np.uint16 and labels.shape == grid.shape_zyx
    assert set(np.unique(labels)) <= {0, 7, 300} and (labels == 7).any()
    np.testing.assert_array_equal(labels != 0, resample_mask(to_sitk(ids, GEOM), grid) == 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize(
    "cfg",
    [DataConfig(spacing=(1.5, 1.5, 2.0), shape=(32, 24, 24), fit="crop"), RESIZE],
    ids=["crop", "resize"],
)
def test_to_original_round_trip(cfg: DataConfig) -> None:
    reference = to_sitk(phantom(), GEOM)
    grid = canonical_grid(GEOM, SIZE_XYZ, cfg)
    canonical = (resample_image(reference, grid, cfg) > 175).astype(np.float32)
    back = to_original(canonical, grid, reference)
    assert Geometry.of(back) == Geometry.of(reference)
    assert back.GetSize() == reference.GetSize()
    assert back.GetPixelID() == sitk.sitkFloat32
    restored = sitk.GetArrayFromImage(back) > 0.5
    assert dice(restored, sphere_mask()) > 0.8
    labels = to_original(canonical.astype(np.uint8), grid, reference, nearest=True)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert dice(sitk.GetArrayFromImage(labels) > 0, sphere_mask()) > 0.8


def test_settings_key_changes_with_each_setting() -> None:
    base = DataConfig()
    keys = {
        settings_key(base),
        settings_key(DataConfig(spacing=(4.0, 5.0, 6.0))),
        settings_key(DataConfig(shape=(48, 48, 16))),
        settings_key(DataConfig(fit="resize")),
        settings_key(DataConfig(hu_window=(-200.0, 350.0))),
    }
    assert len(keys) == 5
    assert settings_key(DataConfig(cache_dir="/elsewhere")) == settings_key(base)


# --------------------------------------------------------------------------- cache


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count calls to io.read_volume, io.read_mask and preprocess.content_hash."""
    counts = {"read_volume": 0, "read_mask": 0, "hash": 0}

    def wrap(module, name: str, key: str) -> None:
        original = getattr(module, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    wrap(io, "read_volume", "read_volume")
    wrap(io, "read_mask", "read_mask")
    wrap(preprocess, "content_hash", "hash")
    return counts


def write_case(folder: Path, array: np.ndarray | None = None) -> tuple[Path, Path]:
    image = io.write_volume(folder / "img.nii.gz", phantom() if array is None else array, GEOM)
    ids = np.zeros((12, 16, 20), dtype=np.uint8)
    ids[sphere_mask()] = 3
    mask = io.write_volume(folder / "mask.nii.gz", ids, GEOM)
    return image, mask


def test_cache_reads_once_and_survives_new_instances(tmp_path: Path, counters) -> None:
    image_path, mask_path = write_case(tmp_path)
    cache = PreprocessCache(tmp_path / "cache", CROP)
    image = cache.image(image_path, "P1")
    mask = cache.mask(mask_path, image_path, "P1")
    assert counters == {"read_volume": 1, "read_mask": 1, "hash": 2}
    assert image.shape == mask.shape == (12, 20, 24)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    direct = resample_image(to_sitk(phantom(), GEOM), canonical_grid(GEOM, SIZE_XYZ, CROP), CROP)
    np.testing.assert_allclose(image, direct, atol=1e-3)  # NIfTI stores geometry as float32

    for _ in range(2):  # later epochs
        np.testing.assert_array_equal(cache.image(image_path, "P1"), image)
        np.testing.assert_array_equal(cache.mask(mask_path, image_path, "P1"), mask)
    assert cache.grid(image_path) == canonical_grid(
        Geometry.of(sitk.ReadImage(str(image_path))), SIZE_XYZ, CROP
    )
    assert counters == {"read_volume": 1, "read_mask": 1, "hash": 2}

    second = PreprocessCache(tmp_path / "cache", CROP)  # a second run: no reads, no hashing
    np.testing.assert_array_equal(second.image(image_path), image)
    np.testing.assert_array_equal(second.mask(mask_path, image_path), mask)
    assert counters == {"read_volume": 1, "read_mask": 1, "hash": 2}

    key = settings_key(CROP)
    names = sorted(p.name for p in (tmp_path / "cache" / key).iterdir())
    assert len(names) == 4 and not any(n.startswith(".tmp") for n in names)
    assert (tmp_path / "cache" / "hashes.json").exists()
    digest = preprocess.content_hash(image_path)
    assert f"img-{digest}.npy" in names


def test_cache_invalidated_by_setting_and_content(tmp_path: Path, counters) -> None:
    image_path, mask_path = write_case(tmp_path)
    cache = PreprocessCache(tmp_path / "cache", CROP)
    first = cache.image(image_path)
    cache.mask(mask_path, image_path)
    assert counters["read_volume"] == 1

    narrow = PreprocessCache(
        tmp_path / "cache", CROP.model_copy(update={"hu_window": (-100.0, 100.0)})
    )
    assert narrow.image(image_path).max() == pytest.approx(100.0)
    assert counters["read_volume"] == 2
    assert counters["hash"] == 2  # the content hash is shared across settings

    changed = phantom()
    changed[changed == BRIGHT] = 200.0
    write_case(tmp_path, changed)  # rewrites image and mask
    again = cache.image(image_path)
    assert counters["read_volume"] == 3
    assert again.max() == pytest.approx(200.0) and first.max() == pytest.approx(350.0)
    # The mask's key includes its image's hash: re-read and re-resampled.
    cache.mask(mask_path, image_path)
    assert counters["read_mask"] == 2


def _entry_meta(cache: PreprocessCache, stem_prefix: str) -> Path:
    (meta,) = [p for p in cache.root.glob(f"{stem_prefix}*.json")]
    return meta


def test_nifti_entries_read_before_the_header_fix_are_remade(tmp_path: Path, counters) -> None:
    """A NIfTI's entry (image and mask) made before NIfTI files were placed by their header
    (no ``reader`` recorded) may hold a mirrored array: it is remade once; an MHA's is
    kept (its reading did not change)."""
    image_path, mask_path = write_case(tmp_path)
    mha = io.write_volume(tmp_path / "img.mha", phantom(), GEOM)
    cache = PreprocessCache(tmp_path / "cache", CROP)
    good_image, good_mask = cache.image(image_path), cache.mask(mask_path, image_path)
    cache.image(mha)
    assert counters["read_volume"] == 2 and counters["read_mask"] == 1
    for npy in cache.root.glob("*.npy"):  # an old entry: other arrays, no reader recorded
        array = np.load(npy)
        np.save(npy, array[..., ::-1].copy())
    for meta_path in cache.root.glob("*.json"):
        meta = json.loads(meta_path.read_text())
        assert meta.pop("reader") == preprocess.READER_VERSION
        meta_path.write_text(json.dumps(meta))
    again = PreprocessCache(tmp_path / "cache", CROP)
    np.testing.assert_array_equal(again.image(image_path), good_image)
    np.testing.assert_array_equal(again.mask(mask_path, image_path), good_mask)
    assert counters["read_volume"] == 3 and counters["read_mask"] == 2  # the NIfTIs only
    mha_again = again.image(mha)
    assert counters["read_volume"] == 3
    np.testing.assert_array_equal(mha_again[..., ::-1], good_image)  # kept as it was


def test_a_nifti_pair_is_hashed_with_both_halves(tmp_path: Path) -> None:
    """Editing the ``.img`` of a ``.hdr``/``.img`` pair changes the content hash (the cache
    would otherwise serve the old array)."""
    import nibabel as nib

    header = tmp_path / "scan.hdr"
    nib.save(nib.Nifti1Pair(phantom().T.copy(), np.diag([2.0, 1.5, 3.0, 1.0])), str(header))
    before = preprocess.content_hash(header)
    data = tmp_path / "scan.img"
    raw = bytearray(data.read_bytes())
    raw[-4:] = b"\x01\x02\x03\x04"
    data.write_bytes(bytes(raw))
    assert preprocess.source_files(header) == [header, data]
    assert preprocess.content_hash(header) != before


def test_a_looping_image_path_is_named_a_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    cache = PreprocessCache(tmp_path / "cache", CROP)
    with pytest.raises(InputError, match="loop of symbolic links"):
        cache.image(loop, "P1")


def test_cache_dicom_folder(tmp_path: Path, counters) -> None:
    folder, stored, _ = make_dicom_series(tmp_path / "dcm", shape=(6, 10, 12))
    cfg = DataConfig(spacing=(1.0, 1.0, 2.0), shape=(8, 8, 6))
    cache = PreprocessCache(tmp_path / "cache", cfg)
    a = cache.image(folder)
    b = PreprocessCache(tmp_path / "cache", cfg).image(folder)
    np.testing.assert_array_equal(a, b)
    assert counters["read_volume"] == 1 and counters["hash"] == 1
    first = sorted(folder.glob("*.dcm"))[0]
    first.rename(folder / "renamed.dcm")  # names are part of the hash
    cache.image(folder)
    assert counters["read_volume"] == 2


def test_bad_input_names_patient(tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache", CROP)
    with pytest.raises(InputError, match="P7") as err:
        cache.image(tmp_path / "missing.nii.gz", "P7")
    assert "missing.nii.gz" in str(err.value)
    image_path, _ = write_case(tmp_path)
    shifted = Geometry(GEOM.spacing, (0.0, 0.0, 0.0), GEOM.direction)
    bad_mask = io.write_volume(tmp_path / "bad_mask.nii.gz", np.ones((12, 16, 20), "u1"), shifted)
    with pytest.raises(InputError, match="P8") as err:
        cache.mask(bad_mask, image_path, "P8")
    assert "geometry" in str(err.value)
    with pytest.raises(InputError, match="P9"):
        cache.mask(tmp_path / "nope.nii.gz", image_path, "P9")


# --------------------------------------------------------------------------- normalizer


def test_normalizer_matches_numpy_and_sees_only_given_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(40, 30, size=(12, 16, 20)).astype(np.float32)
    b = rng.normal(-100, 80, size=(6, 8, 10)).astype(np.float32)
    c = rng.normal(5000, 1, size=(6, 8, 10)).astype(np.float32)
    norm = Normalizer.fit([a, b])
    both = np.concatenate([a.ravel(), b.ravel()]).astype(np.float64)
    assert norm.mean == pytest.approx(both.mean(), rel=1e-12)
    assert norm.std == pytest.approx(both.std(), rel=1e-12)
    assert Normalizer.fit(iter([a, b])) == norm  # a generator works (streaming)
    assert Normalizer.fit([a, b, c]).mean > norm.mean + 100  # c would change it...
    assert norm == Normalizer.fit([a, b])  # ...but fit only sees what it is given
    z = norm(a)
    assert z.dtype == np.float32 and z.shape == a.shape
    np.testing.assert_allclose(z, (a - both.mean()) / both.std(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        Normalizer.fit([])

    path = tmp_path / "run" / "normalization.json"
    save_normalizers(path, {"weak": norm, "strong": Normalizer(1.5, 2.5)})
    assert load_normalizers(path) == {"weak": norm, "strong": Normalizer(1.5, 2.5)}
    with pytest.raises(InputError):
        load_normalizers(tmp_path / "absent.json")


def test_fit_normalizers_per_domain(tmp_path: Path) -> None:
    cfg = DataConfig(spacing=(2.0, 2.0, 3.0), shape=(16, 12, 10))
    paths = {}
    for name, offset in (("w1", 0.0), ("w2", 50.0), ("s1", -100.0)):
        arr = phantom() + offset
        paths[name] = io.write_volume(tmp_path / f"{name}.nii.gz", arr, GEOM)
    cache = PreprocessCache(tmp_path / "cache", cfg)
    norms = fit_normalizers(cache, {"weak": [paths["w1"], paths["w2"]], "strong": [paths["s1"]]})
    weak = [cache.image(paths["w1"]), cache.image(paths["w2"])]
    assert norms["weak"] == Normalizer.fit(weak)
    assert norms["strong"].mean == pytest.approx(cache.image(paths["s1"]).mean(dtype=np.float64))


# --------------------------------------------------------------------------- fit: whole


def test_whole_fit_covers_the_scans_field_of_view_at_the_spacing() -> None:
    """``fit: whole``: the grid is the scan's world bounding box at ``data.spacing``, sized
    per scan (rounded up), centred on the scan: nothing is cropped."""
    whole = DataConfig(fit="whole", spacing=(1.5, 1.5, 2.0), hu_window=(-1000.0, 1000.0))
    assert whole.shape is None
    grid = canonical_grid(GEOM, SIZE_XYZ, whole)
    # 20 x 16 x 12 voxels of 2 x 1.5 x 3 mm: 40 x 24 x 36 mm -> 27 x 16 x 18 at 1.5/1.5/2
    assert grid.size_xyz == (27, 16, 18)
    assert grid.geometry.spacing == (1.5, 1.5, 2.0)
    first = np.array(grid.geometry.origin)
    last = first + np.array(grid.geometry.spacing) * (np.array(grid.size_xyz) - 1)
    lo, hi = (
        world_coords(GEOM, SIZE_XYZ).reshape(-1, 3).min(0),
        world_coords(GEOM, SIZE_XYZ).reshape(-1, 3).max(0),
    )
    np.testing.assert_allclose((first + last) / 2, (lo + hi) / 2, atol=1e-9)  # same centre
    assert np.all(last - first >= hi - lo - 1e-9)  # every voxel centre of the scan inside
    image = resample_image(to_sitk(phantom(), GEOM), grid, whole)
    assert image.shape == (18, 16, 27)
    # the sphere is all there: its volume in mm^3 as in the scan, to a grid voxel's rounding
    scan_mm3 = sphere_mask().sum() * np.prod(GEOM.spacing)
    grid_mm3 = (image > 500).sum() * np.prod(grid.geometry.spacing)
    assert grid_mm3 == pytest.approx(scan_mm3, rel=0.25)  # partial volumes of a 7 mm sphere


def test_whole_fit_config_refuses_a_shape_and_needs_none() -> None:
    with pytest.raises(ValueError, match="no meaning with data.fit: whole"):
        DataConfig(fit="whole", shape=(48, 48, 32))
    with pytest.raises(ValueError, match="needs data.shape"):
        DataConfig(fit="crop", shape=None)
    assert DataConfig(fit="whole", shape=None).shape is None
    # the quick grid's settings key is what it was (the cache stays valid)
    assert settings_key(DataConfig()) == settings_key(DataConfig(shape=(48, 48, 32)))
