"""Per-node findings of a scan's ROI map: where each node is, how big, how suspicious.

A finding is one connected component (26-connectivity) of the ROI mask (probability > ζ,
``core.zeta``) on the scan's own grid. For each it gives:

* the centre (the component's centroid) in patient coordinates, LPS, mm (DICOM's and
  ITK's frame: x to the patient's left, y posterior, z superior);
* the voxel index ``(i, j, k)`` of that centre in the input file (ITK's index order,
  0-based), and the component's index bounding box;
* the volume in mm³;
* the long and short axes in the axial plane, in mm, RECIST style: on the image slice
  (along the index axis closest to the patient's superior axis) where the component is
  longest, the long axis is its largest caliper width and the short axis its width
  perpendicular to it; each voxel counts with its full extent;
* the maximum and mean ROI probability.

Findings are sorted by maximum probability, highest first. ``write_findings`` writes
``findings.csv``; ``slicer_markups`` makes a 3D Slicer markups file (``*.mrk.json``) of
fiducial points at the centres.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lymphdx.core.files import write_csv
from lymphdx.core.zeta import roi_mask
from lymphdx.io.geometry import Geometry

__all__ = [
    "FINDINGS_COLUMNS",
    "Finding",
    "MARKUPS_SCHEMA",
    "find_nodes",
    "findings_json",
    "slicer_markups",
    "write_findings",
]

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as the detection metrics
_ANGLES = np.deg2rad(np.arange(0.0, 180.0, 0.5))  # caliper directions in the axial plane
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)


@dataclass(frozen=True)
class Finding:
    """One node candidate of a scan (see the module doc for each quantity)."""

    node: int  # 1-based rank by max_probability
    max_probability: float
    mean_probability: float
    volume_mm3: float
    long_axis_mm: float
    short_axis_mm: float
    centre_lps_x_mm: float
    centre_lps_y_mm: float
    centre_lps_z_mm: float
    index_i: int
    index_j: int
    index_k: int
    bbox_i0: int
    bbox_j0: int
    bbox_k0: int
    bbox_i1: int  # inclusive
    bbox_j1: int
    bbox_k1: int
    voxels: int

    @property
    def centre_lps(self) -> tuple[float, float, float]:
        return self.centre_lps_x_mm, self.centre_lps_y_mm, self.centre_lps_z_mm


FINDINGS_COLUMNS = tuple(Finding.__dataclass_fields__)


def _axial_axes(points_ijk: np.ndarray, geometry: Geometry) -> tuple[float, float, int]:
    """(long, short, slice) of voxels ``points_ijk`` ``(n, 3)``: on each slice along the
    index axis nearest the patient's superior axis, the largest caliper width of the
    voxels' squares in the patient's axial (x, y) plane, and the width perpendicular to
    it, on the slice where the long axis is largest."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(geometry.spacing, dtype=float)
    axes = direction * spacing  # column c: the world step of index axis c
    normal = int(np.argmax(np.abs(direction[2])))  # index axis closest to superior
    u = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)  # (A, 2) axial directions
    # a voxel's own width along each direction: Σ_c |u · step_c| over the in-plane axes
    in_plane = [c for c in range(3) if c != normal]
    voxel_width = sum(np.abs(u @ axes[:2, c]) for c in in_plane)  # (A,)
    best = (-1.0, 0.0)
    for s in np.unique(points_ijk[:, normal]):
        xy = (points_ijk[points_ijk[:, normal] == s] @ axes.T)[:, :2]  # (m, 2) mm
        proj = xy @ u.T  # (m, A)
        width = proj.max(axis=0) - proj.min(axis=0) + voxel_width
        a = int(np.argmax(width))
        if width[a] > best[0]:
            perpendicular = (a + len(_ANGLES) // 2) % len(_ANGLES)
            best = (float(width[a]), float(width[perpendicular]))
    return best


def find_nodes(prob_zyx: np.ndarray, zeta: float, geometry: Geometry) -> list[Finding]:
    """The findings of ROI probabilities ``prob_zyx`` ``(z, y, x)`` on the grid
    ``geometry``, sorted by maximum probability (empty: no voxel above ``zeta``)."""
    prob = np.asarray(prob_zyx, dtype=np.float32)
    labels, n = ndimage.label(roi_mask(prob, zeta), structure=_STRUCTURE)
    if n == 0:
        return []
    affine = geometry.affine_lps()
    voxel_mm3 = float(np.prod(geometry.spacing))
    rows: list[dict[str, Any]] = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        assert box is not None
        local = labels[box] == label
        zyx = np.argwhere(local) + [s.start for s in box]
        ijk = zyx[:, ::-1].astype(float)  # ITK index order (i, j, k) = (x, y, z)
        values = prob[box][local]
        centre_ijk = ijk.mean(axis=0)
        centre = affine[:3, :3] @ centre_ijk + affine[:3, 3]
        long_axis, short_axis = _axial_axes(ijk, geometry)
        lo, hi = zyx.min(axis=0)[::-1], zyx.max(axis=0)[::-1]
        rows.append(
            {
                "max_probability": float(values.max()),
                "mean_probability": float(values.mean()),
                "volume_mm3": len(values) * voxel_mm3,
                "long_axis_mm": long_axis,
                "short_axis_mm": short_axis,
                "centre_lps_x_mm": float(centre[0]),
                "centre_lps_y_mm": float(centre[1]),
                "centre_lps_z_mm": float(centre[2]),
                "index_i": int(round(centre_ijk[0])),
                "index_j": int(round(centre_ijk[1])),
                "index_k": int(round(centre_ijk[2])),
                "bbox_i0": int(lo[0]),
                "bbox_j0": int(lo[1]),
                "bbox_k0": int(lo[2]),
                "bbox_i1": int(hi[0]),
                "bbox_j1": int(hi[1]),
                "bbox_k1": int(hi[2]),
                "voxels": len(values),
            }
        )
    rows.sort(key=lambda r: (-r["max_probability"], -r["voxels"]))
    return [Finding(node=k, **r) for k, r in enumerate(rows, start=1)]


def _rounded(finding: Finding) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(finding).items()}


def findings_json(findings: list[Finding], zeta: float) -> dict[str, Any]:
    """The findings as ``prediction.json`` holds them, with the convention stated."""
    return {
        "findings_coordinates": "LPS, mm (DICOM patient coordinates); index: ITK (i, j, k)",
        "findings": [_rounded(f) for f in findings],
        "findings_note": None
        if findings
        else f"no ROI component: no voxel has a probability above ζ = {zeta:g}",
    }


def write_findings(path: Path, findings: list[Finding]) -> Path:
    """``findings.csv``: one row per finding, ``FINDINGS_COLUMNS`` (a header alone when
    there is none)."""
    rows = [list(_rounded(f).values()) for f in findings]  # asdict: FINDINGS_COLUMNS' order
    write_csv(path, FINDINGS_COLUMNS, rows)
    return path


def slicer_markups(findings: list[Finding], name: str) -> dict[str, Any]:
    """A 3D Slicer markups point list (``*.mrk.json``): one fiducial per finding at its
    centre (LPS, mm), labelled with its rank and maximum probability."""
    points = [
        {
            "id": str(f.node),
            "label": f"node {f.node} p={f.max_probability:.2f}",
            "description": (
                f"max ROI probability {f.max_probability:.3f}, short axis "
                f"{f.short_axis_mm:.1f} mm, long axis {f.long_axis_mm:.1f} mm, "
                f"volume {f.volume_mm3:.0f} mm3"
            ),
            "associatedNodeID": "",
            "position": [round(c, 4) for c in f.centre_lps],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": True,
            "visibility": True,
            "positionStatus": "defined",
        }
        for f in findings
    ]
    markup = {
        "type": "Fiducial",
        "name": f"{name} nodes",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": True,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(points),
        "controlPoints": points,
        "measurements": [],
    }
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}
