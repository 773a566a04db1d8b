"""Issue 29: what the node readout reads in each scan: are the regions that the ROI map
finds real nodes, and which one makes the scan's probability?

For each scan stored by ``issue29_node_maps.py`` (``MAPS``), the synthetic data's truth
masks (``DATA/weak_truth``) are put on the working grid as ``evaluate`` prepares the scan;
each region of the map (``engine.node_readings``: 0.5, at least 4 voxels, the 32 largest)
is a *node* when at least 30 % of its voxels are inside a truth node (metastatic or
benign), otherwise a *false region*. The run's fitted readout (``RUN/roi_readout.json``)
scores each region. Printed: per scan, its label, its probability and what its most
suspicious region is; then the counts, and the readings' medians for nodes and for false
regions, so that a reading that tells them apart shows.

    python benchmarks/issue29_false_nodes.py RUN MAPS DATA
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lymphdx.core.config import load_config
from lymphdx.data.grid import resample_labels
from lymphdx.data.scan_prep import prepare_scan
from lymphdx.engine.node_readings import NODE_FEATURES, node_regions, node_table
from lymphdx.engine.node_readout import THRESHOLD, NodeReadout

NODE_SHARE = 0.3  # a region is a node when this share of its voxels lies in a truth node


def regions(roi: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per region of ``roi`` ``(D, H, W)`` in ``node_table``'s order: the truth node id it
    lies most in (0: none) and whether it is a node (``NODE_SHARE`` of it in truth)."""
    labels, order = node_regions(roi, THRESHOLD)
    ids, is_node = [], []
    for lab in order:
        inside = truth[labels == lab]
        counts = np.bincount(inside.astype(np.int64))
        ids.append(int(np.argmax(counts[1:]) + 1) if len(counts) > 1 and counts[1:].any() else 0)
        is_node.append(bool((inside > 0).mean() >= NODE_SHARE))
    return np.asarray(ids), np.asarray(is_node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("maps", type=Path)
    ap.add_argument("data", type=Path, help="the lymphdx synth folder (weak_truth/)")
    args = ap.parse_args()
    config = load_config(args.run / "config.yaml")
    readout = NodeReadout.from_json(json.loads((args.run / "roi_readout.json").read_text()))
    metastatic = {}
    with open(args.data / "weak_truth" / "nodes.csv") as f:
        for row in csv.DictReader(f):
            metastatic[(row["patient_id"], int(row["node_id"]))] = int(row["metastatic"])
    tables, kinds, rows = [], [], []
    for path in sorted(args.maps.glob("W*.npz")):
        pid = path.stem
        d = np.load(path)
        roi = d["roi"].astype(np.float32) / 255.0
        table = node_table(roi, d["image"].astype(np.float32), d["voxel_mm"], THRESHOLD)
        grid = prepare_scan(args.data / "weak" / "images" / f"{pid}.nii.gz", config.data, pid)
        truth = sitk.ReadImage(str(args.data / "weak_truth" / "masks" / f"{pid}.nii.gz"))
        ids, is_node = regions(roi, resample_labels(truth, grid.grid))
        assert len(ids) == len(table), (pid, len(ids), len(table))
        kind = np.where(is_node, 1, 0)
        kind[
            [n and metastatic.get((pid, int(i)), 0) == 1 for i, n in zip(ids, is_node, strict=True)]
        ] = 2
        tables.append(table)
        kinds.append(kind)
        p = readout.node_probability(table) if len(table) else np.zeros(0)
        top = int(np.argmax(p)) if len(p) else -1
        what = ("false region", "benign node", "metastatic node")[kind[top]] if top >= 0 else "-"
        rows.append(
            (
                float(p.max()) if len(p) else 0.0,
                pid,
                int(d["label"]),
                str(d["split"]),
                len(table),
                what,
            )
        )
    rows.sort(key=lambda r: -r[0])
    print("probability patient label split regions most-suspicious")
    for p, pid, y, split, n, what in rows:
        print(f"{p:.3f} {pid} {y} {split:5s} {n:3d} {what}")
    all_kinds = np.concatenate(kinds)
    table = np.concatenate(tables)
    print(
        f"\nregions: {len(all_kinds)}; false {int((all_kinds == 0).sum())}, "
        f"benign nodes {int((all_kinds == 1).sum())}, metastatic {int((all_kinds == 2).sum())}"
    )
    for split in sorted({r[3] for r in rows}):
        for y in (0, 1):
            tops = [r[5] for r in rows if r[2] == y and r[3] == split]
            share = {w: tops.count(w) for w in sorted(set(tops))}
            print(f"{split} label {y} scans ({len(tops)}), most suspicious region: {share}")
    print("\nmedian reading " + " ".join(f"{n:>10s}" for n in ("false", "benign", "metastatic")))
    for j, name in enumerate(NODE_FEATURES):
        meds = [
            np.median(table[all_kinds == k, j]) if (all_kinds == k).any() else np.nan
            for k in (0, 1, 2)
        ]
        print(f"{name:14s} " + " ".join(f"{m:10.2f}" for m in meds))


if __name__ == "__main__":
    main()
