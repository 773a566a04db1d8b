"""Which nodes does a run's ROI mask mark: metastatic ones, benign ones, or both?

Synthetic data only (``weak_truth`` holds each weak scan's node instances and whether
each is metastatic). Runs ``lymphdx.workflows.predict.predict`` on the weak set's test scans of a
run and counts, per node class, the share of nodes that the mask (> ζ) touches, and the
mask's connected components that touch no node. A decoder taught by masks of every node
marks both classes alike; one that the scan label also teaches (``model.roi_evidence:
trained``, attention pooling) marks metastatic nodes more than benign ones, which costs
Dice against masks of every node (BENCHMARKS.md section 1.1; the dev log,
docs/dev-log-2026-11-25_to_2026-12-03.md, section 7).
With ``--components PATIENT`` it also lists, for that test patient, each mask component's
size and centre in millimetres (SimpleITK's index-to-physical transform, LPS) beside the
phantom's nodes, so that a reader can see which node each component lies on.
Usage: python benchmarks/node_hits.py RUN [RUN ...] [--components PATIENT]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lymphdx.engine.run_folder import load_run_config
from lymphdx.workflows.predict import predict


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _components(mask_path: Path) -> list[dict[str, object]]:
    """Each connected component of a mask file: voxel count and centre in mm."""
    image = sitk.ReadImage(str(mask_path))
    labels, n = ndimage.label(sitk.GetArrayFromImage(image) > 0)
    out = []
    for i in range(1, n + 1):
        centre_zyx = ndimage.center_of_mass(labels == i)
        centre = image.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre_zyx[::-1]])
        out.append({"voxels": int((labels == i).sum()), "centre_mm": [round(c, 1) for c in centre]})
    return out


def node_hits(run: Path, components_of: str | None = None) -> dict[str, object]:
    """Hit rates of metastatic and benign nodes and the stray components of one run."""
    config = load_run_config(run)
    data = Path(config.manifests.weak).parent.parent
    test = [
        r["patient_id"]
        for r in csv.DictReader(open(run / "splits.csv"))
        if r["set"] == "weak" and r["split"] == "test"
    ]
    metastatic = {
        (r["patient_id"], int(r["node_id"])): r["metastatic"] == "1"
        for r in csv.DictReader(open(data / "weak_truth" / "nodes.csv"))
    }
    hits = {True: [0, 0], False: [0, 0]}  # class -> [hit, total]
    stray = 0
    listed: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = [data / "weak" / "images" / f"{pid}.nii.gz" for pid in test]
        predict(run, images, Path(tmp))
        for pid in test:
            mask = _array(Path(tmp) / pid / "roi_mask.nii.gz") > 0
            truth = _array(data / "weak_truth" / "masks" / f"{pid}.nii.gz")
            for node in np.unique(truth[truth > 0]):
                cls = metastatic[(pid, int(node))]
                hits[cls][1] += 1
                hits[cls][0] += int(mask[truth == node].any())
            components, n = ndimage.label(mask)
            stray += sum(not (truth[components == i] > 0).any() for i in range(1, n + 1))
            if pid == components_of:
                listed = {
                    "patient": pid,
                    "mask_components": _components(Path(tmp) / pid / "roi_mask.nii.gz"),
                    "nodes": [
                        {k: r[k] for k in ("node_id", "x_mm", "y_mm", "z_mm", "metastatic")}
                        for r in csv.DictReader(open(data / "weak_truth" / "nodes.csv"))
                        if r["patient_id"] == pid
                    ],
                }
    return {
        "run": str(run),
        "metastatic_nodes_hit": f"{hits[True][0]}/{hits[True][1]}",
        "benign_nodes_hit": f"{hits[False][0]}/{hits[False][1]}",
        "metastatic_hit_rate": round(hits[True][0] / max(hits[True][1], 1), 3),
        "benign_hit_rate": round(hits[False][0] / max(hits[False][1], 1), 3),
        "components_on_no_node": stray,
        "scans": len(test),
        **({"components": listed} if listed else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--components", metavar="PATIENT", default=None)
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps(node_hits(run, args.components)))


if __name__ == "__main__":
    main()
