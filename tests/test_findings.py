"""Per-node findings against hand-made ellipsoids of known size and position, on an
axis-aligned grid and on a permuted, oblique one (millimetres checked against
SimpleITK's index-to-physical transform)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lymphdx.io.geometry import Geometry
from lymphdx.workflows.findings import (
    FINDINGS_COLUMNS,
    find_nodes,
    findings_json,
    slicer_markups,
    write_findings,
)


def _ellipsoids(
    geometry: Geometry, shape_zyx: tuple[int, int, int], nodes: list[tuple]
) -> np.ndarray:
    """Probabilities ``(z, y, x)``: 0.1, and ``p`` inside each ellipsoid ``(centre LPS,
    semi-axes along LPS x, y, z in mm, p)``, tested at every voxel centre in mm."""
    k, j, i = np.indices(shape_zyx)
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    a = geometry.affine_lps()
    world = ijk @ a[:3, :3].T + a[:3, 3]
    prob = np.full(len(world), 0.1, dtype=np.float32)
    for centre, semi, p in nodes:
        inside = (((world - centre) / semi) ** 2).sum(axis=1) <= 1.0
        prob[inside] = p
    return prob.reshape(shape_zyx)


def _sitk_centre(prob: np.ndarray, geometry: Geometry, label_p: float) -> tuple:
    """The centroid of the voxels at ``label_p``, mapped by SimpleITK."""
    zyx = np.argwhere(np.isclose(prob, label_p)).mean(axis=0)
    image = geometry.apply(sitk.Image([int(n) for n in prob.shape[::-1]], sitk.sitkFloat32))
    return image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])


ROT = math.radians(30.0)
R = np.array([[math.cos(ROT), -math.sin(ROT), 0], [math.sin(ROT), math.cos(ROT), 0], [0, 0, 1]])
GRIDS = {
    # axis-aligned, anisotropic
    "aligned": (Geometry((0.8, 0.8, 2.0), (-100.0, 50.0, 30.0)), (40, 90, 110)),
    # index axes permuted (i → rotated y, j → superior, k → rotated x) and turned 30°
    # in the axial plane: columns of the direction matrix
    "permuted_oblique": (
        Geometry(
            (0.7, 1.5, 0.9),
            (20.0, -40.0, 10.0),
            tuple(np.stack([R[:, 1], [0.0, 0.0, 1.0], R[:, 0]], axis=1).ravel()),
        ),
        (110, 60, 120),
    ),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_two_ellipsoids_are_found_where_and_as_large_as_they_are(grid: str) -> None:
    geometry, shape = GRIDS[grid]
    a = geometry.affine_lps()
    middle = a[:3, :3] @ (np.array(shape[::-1]) / 2.0) + a[:3, 3]
    big = (middle + [-12.0, 5.0, 0.0], np.array([10.0, 6.0, 8.0]), 0.95)
    small = (middle + [15.0, -10.0, 6.0], np.array([4.0, 4.0, 5.0]), 0.85)
    prob = _ellipsoids(geometry, shape, [big, small])
    found = find_nodes(prob, 0.8, geometry)
    assert [f.node for f in found] == [1, 2]
    for f, (centre, semi, p) in zip(found, [big, small], strict=True):
        assert f.max_probability == pytest.approx(p) and f.mean_probability == pytest.approx(p)
        # the centre: SimpleITK's transform of the voxels' centroid, and the true centre
        np.testing.assert_allclose(f.centre_lps, _sitk_centre(prob, geometry, p), atol=1e-6)
        np.testing.assert_allclose(f.centre_lps, centre, atol=0.5)
        # its voxel index maps back near the centre
        index_mm = a[:3, :3] @ [f.index_i, f.index_j, f.index_k] + a[:3, 3]
        assert np.linalg.norm(index_mm - centre) < np.linalg.norm(geometry.spacing)
        # sizes: within a voxel of the ellipsoid's axial diameters, volume within 10%
        step = max(geometry.spacing)
        assert abs(f.long_axis_mm - 2 * max(semi[:2])) <= step
        assert abs(f.short_axis_mm - 2 * min(semi[:2])) <= step
        assert f.volume_mm3 == pytest.approx(4 / 3 * math.pi * semi.prod(), rel=0.1)
        assert f.voxels * np.prod(geometry.spacing) == pytest.approx(f.volume_mm3)
        box = np.array([[f.bbox_i0, f.bbox_j0, f.bbox_k0], [f.bbox_i1, f.bbox_j1, f.bbox_k1]])
        assert np.all(box[0] <= [f.index_i, f.index_j, f.index_k])
        assert np.all([f.index_i, f.index_j, f.index_k] <= box[1])


def test_no_component_is_said_and_files_are_written(tmp_path: Path) -> None:
    geometry, shape = GRIDS["aligned"]
    empty = np.full(shape, 0.3, dtype=np.float32)
    assert find_nodes(empty, 0.8, geometry) == []
    info = findings_json([], 0.8)
    assert info["findings"] == [] and "no voxel" in info["findings_note"]
    write_findings(tmp_path / "none.csv", [])
    assert (tmp_path / "none.csv").read_text().strip() == ",".join(FINDINGS_COLUMNS)

    a = geometry.affine_lps()
    centre = a[:3, :3] @ (np.array(shape[::-1]) / 2.0) + a[:3, 3]
    found = find_nodes(
        _ellipsoids(geometry, shape, [(centre, np.full(3, 5.0), 0.9)]), 0.8, geometry
    )
    write_findings(tmp_path / "findings.csv", found)
    rows = list(csv.DictReader(open(tmp_path / "findings.csv")))
    assert len(rows) == 1 and float(rows[0]["centre_lps_x_mm"]) == pytest.approx(centre[0], abs=0.5)
    assert "LPS" in findings_json(found, 0.8)["findings_coordinates"]


def test_slicer_markups_have_the_schemas_required_keys() -> None:
    """The keys and types that Slicer's markups schema (v1.0.3) requires or constrains."""
    geometry, shape = GRIDS["aligned"]
    a = geometry.affine_lps()
    centre = a[:3, :3] @ (np.array(shape[::-1]) / 2.0) + a[:3, 3]
    found = find_nodes(
        _ellipsoids(geometry, shape, [(centre, np.full(3, 5.0), 0.9)]), 0.8, geometry
    )
    doc = json.loads(json.dumps(slicer_markups(found, "scan")))  # JSON as written
    assert set(doc) >= {"@schema", "markups"} and doc["@schema"].endswith(".json#")
    (markup,) = doc["markups"]
    assert markup["type"] in ("Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI")
    assert markup["coordinateSystem"] in ("LPS", "RAS") and markup["coordinateUnits"] == "mm"
    (point,) = markup["controlPoints"]
    assert isinstance(point["id"], str) and "0.90" in point["label"]
    assert len(point["position"]) == 3 and all(isinstance(v, float) for v in point["position"])
    assert len(point["orientation"]) == 9
    assert point["positionStatus"] in ("undefined", "preview", "defined")
    np.testing.assert_allclose(point["position"], found[0].centre_lps, atol=1e-3)


def test_overlay_edge_labels_follow_the_direction_cosines() -> None:
    from lymphdx.workflows.predict import edge_labels

    # LPS identity (NIfTI read by ITK from an RAS-stored file is usually this): the
    # radiological view, patient's right on the left of the image, anterior at the top
    assert edge_labels((1, 0, 0, 0, 1, 0, 0, 0, 1)) == {
        "left": "R",
        "right": "L",
        "top": "A",
        "bottom": "P",
    }
    # x index towards the patient's right, y index towards anterior (an RAS-like grid)
    assert edge_labels((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == {
        "left": "L",
        "right": "R",
        "top": "P",
        "bottom": "A",
    }
    # the permuted oblique grid of the findings tests: i ~ rotated y, j ~ superior
    geometry, _ = GRIDS["permuted_oblique"]
    labels = edge_labels(geometry.direction)
    assert (labels["left"], labels["right"]) == ("A", "P") and labels["bottom"] == "S"
