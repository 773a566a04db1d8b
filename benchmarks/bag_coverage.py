"""Does the classifier's bag see the metastatic nodes? (issue 29, the tile classifier)

``training.sampler: tiles`` reads a scan as the tiles around its ROI map's
``inference.bag_tiles`` highest separated peaks. If a positive scan's metastatic node is
not inside any of them, no classifier can call the scan positive from its bag. For the
first ``--n`` weak patients of ``--split`` of a finished run (default its training
patients: a diagnostic, not a score), this maps each scan with the run's ``best.pt`` (no
flip, as the refresh), places the bag's tiles, and counts the phantom's true nodes
(``DATA/weak_truth``: instance masks and ``nodes.csv``) whose centre of mass on the
working grid lies inside a tile: metastatic and benign nodes apart, and the positive
scans with at least one metastatic node inside their bag. It also gives the classifier's
AUC on those patients in eval mode (the inferer's bag, no flip): on training patients,
whether the classifier fits them at all, beside the run's held-out AUC.

    OMP_NUM_THREADS=1 python benchmarks/bag_coverage.py RUN DATA --n 20

Prints one JSON line. Reads the run and the data, writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lymphdx.data.grid import resample_labels  # noqa: E402
from lymphdx.data.scan_prep import prepare_scan  # noqa: E402
from lymphdx.engine.candidates import peaks  # noqa: E402
from lymphdx.engine.inferer import SlidingWindowInferer  # noqa: E402
from lymphdx.engine.run_data import load_run_data  # noqa: E402
from lymphdx.engine.run_folder import load_model  # noqa: E402
from lymphdx.stats.metrics import auc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path, help="the lymphdx synth folder (weak_truth/)")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    config, model, _ = load_model(args.run, "best")
    data = load_run_data(config, args.run, need_strong=False)
    scans = data.volumes("weak", args.split)
    records = {r.patient_id: r for r in data.weak}
    metastatic: dict[tuple[str, int], int] = {}
    with open(args.data / "weak_truth" / "nodes.csv") as f:
        for row in csv.DictReader(f):
            metastatic[(row["patient_id"], int(row["node_id"]))] = int(row["metastatic"])
    x, y, z = config.inference.bag_tile or config.inference.tile
    half = np.array([z, y, x]) / 2
    inferer = SlidingWindowInferer(config.inference)
    labels_y, probs = [], []
    counts = {"met_in": 0, "met": 0, "benign_in": 0, "benign": 0, "pos_seen": 0, "pos": 0}
    n = min(args.n, len(scans))
    for i in range(n):
        pid = scans.patient_ids[i]
        grid = prepare_scan(records[pid].image, config.data, pid).grid
        truth = sitk.ReadImage(str(args.data / "weak_truth" / "masks" / f"{pid}.nii.gz"))
        ids = resample_labels(truth, grid)
        image = torch.from_numpy(np.ascontiguousarray(scans.image(i)))[None, None]
        assert ids.shape == image.shape[2:], (pid, ids.shape, image.shape)
        with torch.no_grad():
            prob = inferer.roi_map(model, image, flips=False)[0, 0].numpy()
        centres = np.array(peaks(prob, config.inference.bag_tiles, [int(h) for h in half]))
        with torch.no_grad():
            probs.append(float(inferer(model, image, roi=False, flips=False)["cls"][0]))
        labels_y.append(records[pid].label)
        labels = [int(v) for v in np.unique(ids) if v > 0]
        seen_met = False
        for node, com in zip(labels, ndimage.center_of_mass(ids > 0, ids, labels), strict=True):
            inside = bool((np.abs(centres - np.array(com)) < half).all(1).any())
            kind = "met" if metastatic.get((pid, node), 0) else "benign"
            counts[kind] += 1
            counts[f"{kind}_in"] += int(inside)
            seen_met |= inside and kind == "met"
        if any(metastatic.get((pid, node), 0) for node in labels):
            counts["pos"] += 1
            counts["pos_seen"] += int(seen_met)
    share = {
        "metastatic_nodes_in_bag": counts["met_in"] / max(counts["met"], 1),
        "benign_nodes_in_bag": counts["benign_in"] / max(counts["benign"], 1),
        "positive_scans_with_a_metastatic_node_in_bag": counts["pos_seen"] / max(counts["pos"], 1),
    }
    fit = auc(np.array(labels_y), np.array(probs)) if len(set(labels_y)) == 2 else None
    print(json.dumps({"run": str(args.run), "scans": n, **counts, **share, "cls_auc": fit}))


if __name__ == "__main__":
    main()
