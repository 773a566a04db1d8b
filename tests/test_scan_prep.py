"""Tests of lymphdx.data.scan_prep: one preparation of a scan for training's cache,
evaluate and predict, and the way back onto the scan's grid."""

from __future__ import annotations

import numpy as np
import pytest

from lymphdx.core.config import DataConfig
from lymphdx.data.grid import canonical_grid
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.data.scan_prep import prepare_scan, prepare_volume
from lymphdx.data.synthetic import make_scan, patient_rng
from lymphdx.io import volumes as io
from lymphdx.io.geometry import Geometry, Volume

CFG = DataConfig()  # the quick preset's grid: 48 x 48 x 32 at 5 x 5 x 6 mm


@pytest.fixture(scope="module")
def scan_hu():
    """One phantom scan of the weak hospital, (z, y, x) int16-valued HU."""
    return make_scan(patient_rng(0, "weak", 3), "A", True)


def test_raw_ct_numbers_prepare_to_the_same_array_as_hu(tmp_path, scan_hu):
    hu_path = io.write_volume(tmp_path / "hu.nii.gz", scan_hu.hu.astype(np.int16), scan_hu.geometry)
    raw = (scan_hu.hu + 1024).astype(np.uint16)
    raw_path = io.write_volume(tmp_path / "raw.nii.gz", raw, scan_hu.geometry)
    hu, corrected = prepare_scan(hu_path, CFG, "P1"), prepare_scan(raw_path, CFG, "P1")
    np.testing.assert_array_equal(corrected.array, hu.array)
    assert hu.hu_map == (1.0, 0.0) and hu.notes == ()
    assert corrected.hu_map == (1.0, -1024.0)
    assert "raw CT numbers" in corrected.notes[0]
    np.testing.assert_array_equal(corrected.source.array, scan_hu.hu)
    assert corrected.array.shape == (32, 48, 48) and corrected.array.dtype == np.float32
    assert corrected.array.min() >= CFG.hu_window[0] and corrected.array.max() <= CFG.hu_window[1]


def test_the_cache_holds_what_prepare_scan_gives(tmp_path, scan_hu):
    """Training's cache (and evaluate, which reads it) and predict see the same array."""
    path = io.write_volume(tmp_path / "s.nii.gz", scan_hu.hu.astype(np.int16), scan_hu.geometry)
    cache = PreprocessCache(tmp_path / "cache", CFG)
    fresh = cache.image(path, "P1")
    again = PreprocessCache(tmp_path / "cache", CFG).image(path, "P1")  # read from disk
    prepared = prepare_scan(path, CFG, "P1")
    np.testing.assert_array_equal(fresh, prepared.array)
    np.testing.assert_array_equal(again, prepared.array)
    assert cache.grid(path, "P1") == prepared.grid
    assert cache.source_grid(path, "P1") == prepared.source_grid


def test_to_original_is_the_identity_on_a_scan_already_on_the_grid():
    """A scan whose grid is the working grid comes back voxel for voxel."""
    spacing, size = CFG.spacing, CFG.shape
    geometry = Geometry(tuple(spacing), (-117.5, -117.5, -93.0))
    rng = np.random.default_rng(0)
    array = rng.uniform(-100, 100, size=tuple(reversed(size))).astype(np.float32)
    array[0, 0, :4] = -1000.0  # some air, so that the scan reads as HU
    array[-1, -1, -6:] = -1000.0
    prepared = prepare_volume(Volume(array, geometry), CFG)
    assert prepared.grid == canonical_grid(geometry, size, CFG)
    np.testing.assert_allclose(prepared.grid.geometry.origin, geometry.origin, atol=1e-9)
    np.testing.assert_allclose(prepared.array, np.clip(array, *CFG.hu_window), atol=1e-4)
    marked = np.zeros(prepared.grid.shape_zyx, np.float32)
    marked[5, 7, 9] = 1.0
    np.testing.assert_allclose(prepared.to_original(marked), marked, atol=1e-6)


def test_to_original_lands_on_the_scans_voxels_for_a_flipped_finer_scan(scan_hu):
    """An ROI map on the working grid goes back onto a scan stored with flipped x and y
    axes: the voxel nearest a world point on the grid maps to the scan's voxel there."""
    spacing = (2.0, 2.0, 3.0)
    size = (100, 100, 50)
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    origin = (99.0, 99.0, -73.5)  # voxel centres from +99 to -99 mm in x and y
    array = np.full(tuple(reversed(size)), 40.0, np.float32)
    array[:, :3, :] = -1000.0  # air at the edge, so the scan reads as HU
    geometry = Geometry(spacing, origin, direction)
    prepared = prepare_volume(Volume(array, geometry), CFG)
    world = np.array([12.5, -22.5, 3.0])  # a grid voxel centre (the grid is centred at 0)
    index = np.rint(
        (world - np.array(prepared.grid.geometry.origin)) / np.array(CFG.spacing)
    ).astype(int)
    on_grid = np.zeros(prepared.grid.shape_zyx, np.float32)
    on_grid[index[2], index[1], index[0]] = 1.0
    back = prepared.to_original(on_grid)
    assert back.shape == tuple(reversed(size))
    k, j, i = np.unravel_index(np.argmax(back), back.shape)
    found = np.array(origin) + np.array(direction).reshape(3, 3) @ (np.array(spacing) * [i, j, k])
    assert np.all(np.abs(found - world) <= np.array(spacing))  # within one scan voxel
