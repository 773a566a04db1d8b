"""Node-level readings of an ROI map (engine.node_readings), against hand-worked shapes."""

from __future__ import annotations

import numpy as np
import pytest

from lymphdx.engine.node_readings import NODE_FEATURES, node_regions, node_table

SPACING = np.array([2.5, 1.5, 1.5])  # mm, (D, H, W)
SHAPE = (40, 64, 64)


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(
        *[np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)], indexing="ij"
    )


def _ellipsoid(centre: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
    z, y, x = _grid()
    r2 = sum(((c - m) / a) ** 2 for c, m, a in zip((z, y, x), centre, semi, strict=True))
    return r2 <= 1.0


def _row(table: np.ndarray, i: int) -> dict[str, float]:
    return dict(zip(NODE_FEATURES, table[i], strict=True))


def test_axes_roundness_and_volume_of_an_ellipsoid_and_a_sphere() -> None:
    """A 24 x 12 x 8 mm ellipsoid and a 10 mm sphere: axes within a voxel, the sphere round,
    volumes within 10 % of 4/3 pi abc, largest first, fill near 1 (smooth margins)."""
    oval = _ellipsoid((20.0, 30.0, 70.0), (4.0, 12.0, 6.0))  # z, y, x semi-axes
    ball = _ellipsoid((50.0, 50.0, 40.0), (5.0, 5.0, 5.0))
    roi = (oval | ball).astype(np.float32)
    table = node_table(roi, np.ones(SHAPE), SPACING)
    assert table.shape == (2, len(NODE_FEATURES))
    big, small = _row(table, 0), _row(table, 1)
    assert big["long_mm"] == pytest.approx(24.0, abs=1.5)
    assert big["short_mm"] == pytest.approx(8.0, abs=1.5)
    assert big["roundness"] == pytest.approx(8.0 / 24.0, abs=0.07)
    assert np.exp(big["log_volume"]) == pytest.approx(4 / 3 * np.pi * 4 * 12 * 6, rel=0.1)
    assert small["short_mm"] == pytest.approx(10.0, abs=1.5)
    assert small["roundness"] > 0.85
    assert 0.85 < big["fill"] < 1.1 and 0.85 < small["fill"] < 1.1


def test_intensity_readings_and_a_necrotic_core() -> None:
    """A sphere whose inner 2.5 mm is 1 unit darker than its rim: core_drop > 0, the 10th
    percentile at the core's value; a uniform sphere reads 0 spread and 0 drop."""
    z, y, x = _grid()
    r = np.sqrt((z - 50) ** 2 + (y - 45) ** 2 + (x - 45) ** 2)
    roi = (r <= 6).astype(np.float32)
    image = np.where(r < 2.5, 0.0, 1.0)
    row = _row(node_table(roi, image, SPACING), 0)
    inside = image[r <= 6]
    assert row["int_mean"] == pytest.approx(inside.mean())
    assert row["int_sd"] == pytest.approx(inside.std())
    assert row["int_p10"] == pytest.approx(np.percentile(inside, 10))
    assert row["core_drop"] > 0.3
    flat = _row(node_table(roi, np.full(SHAPE, 2.0), SPACING), 0)
    assert flat["int_sd"] == pytest.approx(0.0) and flat["core_drop"] == pytest.approx(0.0)
    assert flat["prob_mean"] == pytest.approx(1.0)


def test_threshold_small_regions_and_limits() -> None:
    """Below the threshold, or under min_voxels, is no node; max_nodes keeps the largest."""
    roi = np.zeros(SHAPE, dtype=np.float32)
    assert node_table(roi, roi, SPACING).shape == (0, len(NODE_FEATURES))
    roi[5, 5, 5:7] = 0.9  # 2 voxels
    roi[20:23, 20:23, 20:23] = 0.9  # 27 voxels
    roi[30:34, 40:44, 40:44] = 0.4  # below 0.5
    assert len(node_table(roi, roi, SPACING)) == 1
    assert len(node_table(roi, roi, SPACING, min_voxels=2)) == 2
    assert len(node_table(roi, roi, SPACING, threshold=0.3)) == 2
    assert len(node_table(roi, roi, SPACING, min_voxels=2, max_nodes=1)) == 1
    with pytest.raises(ValueError, match="one \\(D, H, W\\) grid"):
        node_table(roi, roi[:-1], SPACING)


def test_shell_readings_read_the_image_around_the_node_outside_other_nodes() -> None:
    """A 6 mm sphere in a shell of value 0.2 (1-4.5 mm out) beyond which the image is 5:
    shell_mean 0.2 and shell_sd 0; a second node touching the shell on one side is left
    out of it, whatever its image value; a node with no shell reads its own mean and 0."""
    z, y, x = _grid()
    r = np.sqrt((z - 50) ** 2 + (y - 45) ** 2 + (x - 45) ** 2)
    roi = (r <= 6).astype(np.float32)
    image = np.where(r <= 6, 1.0, np.where(r <= 12, 0.2, 5.0))
    row = _row(node_table(roi, image, SPACING), 0)
    assert row["shell_mean"] == pytest.approx(0.2, abs=1e-6)
    assert row["shell_sd"] == pytest.approx(0.0, abs=1e-6)
    # a neighbour 2-4 mm beyond the sphere's surface on +x, image 9 inside it
    near = (x - 45 >= 8) & (x - 45 <= 10) & (np.abs(z - 50) <= 5) & (np.abs(y - 45) <= 5)
    roi2, image2 = roi.copy(), image.copy()
    roi2[near], image2[near] = 1.0, 9.0
    table = node_table(roi2, image2, SPACING)
    assert len(table) == 2
    sphere = _row(table, int(np.argmax(table[:, NODE_FEATURES.index("roundness")])))
    assert sphere["shell_mean"] == pytest.approx(0.2, abs=1e-6)
    # a node that fills the field of view has no shell
    full = _row(node_table(np.ones((6, 6, 6), np.float32), np.full((6, 6, 6), 3.0), SPACING), 0)
    assert full["shell_mean"] == pytest.approx(3.0) and full["shell_sd"] == 0.0


def test_node_regions_are_the_rows_of_the_table() -> None:
    """node_regions labels the regions node_table reads, in its row order: each region's
    voxel count is its row's volume."""
    roi = np.zeros(SHAPE, dtype=np.float32)
    roi[20:23, 20:23, 20:23] = 0.9  # 27 voxels
    roi[2:6, 40:46, 40:46] = 0.8  # 144 voxels
    roi[30, 5, 5:7] = 0.9  # 2 voxels: too small
    labels, order = node_regions(roi)
    table = node_table(roi, roi, SPACING)
    sizes = [int((labels == lab).sum()) for lab in order]
    assert sizes == [144, 27] and len(table) == 2
    np.testing.assert_allclose(
        np.exp(table[:, NODE_FEATURES.index("log_volume")]), np.array(sizes) * SPACING.prod()
    )
