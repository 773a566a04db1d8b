"""How well does the phantom's ground truth separate a synthetic weak set's patients?

Reads ``DATA/weak/manifest.csv`` and ``DATA/weak_truth/nodes.csv`` (``lymphdx synth``)
and prints, per data folder, the AUC of per-patient readings of the true nodes: the
largest node's approximate short axis (diameter × roundness^(2/3)), its largest diameter,
its largest roundness and the node count. An upper bound on what any reading of node
sizes and shapes can reach on that draw of patients (BENCHMARKS.md section 3.3;
docs/dev-log-2026-11-25_to_2026-12-03.md section 7.4).
Usage: python benchmarks/truth_separability.py DATA [DATA ...]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def readings(data: Path) -> dict[str, float]:
    """AUC of each truth reading over the weak set's labelled patients."""
    with open(data / "weak" / "manifest.csv", newline="") as f:
        labels = {r["patient_id"]: int(r["label"]) for r in csv.DictReader(f)}
    nodes: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(data / "weak_truth" / "nodes.csv", newline="") as f:
        for r in csv.DictReader(f):
            nodes[r["patient_id"]].append((float(r["diameter_mm"]), float(r["roundness"])))
    pids = sorted(labels)
    y = np.array([labels[p] for p in pids])
    feats: dict[str, list[float]] = defaultdict(list)
    for p in pids:
        a = np.array(nodes[p]) if nodes[p] else np.zeros((1, 2))
        feats["max_short_axis"].append(float((a[:, 0] * a[:, 1] ** (2 / 3)).max()))
        feats["max_diameter"].append(float(a[:, 0].max()))
        feats["max_roundness"].append(float(a[:, 1].max()))
        feats["node_count"].append(float(len(nodes[p])))
    return {k: round(float(roc_auc_score(y, v)), 3) for k, v in feats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path, nargs="+")
    args = parser.parse_args()
    print(json.dumps({str(d): readings(d) for d in args.data}, indent=1))


if __name__ == "__main__":
    main()
