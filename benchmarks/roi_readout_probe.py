"""How well does each reading of a trained model separate the weak set's patients?

For every fold of a ``compare --cv`` repeat, loads the run's selected weights and scores,
on its training and its held-out (test) weak patients, the classifier's probability
against three readings of its ROI map: the largest ROI probability, the mean of the 20
largest, and the sum; and, for a model with ``model.malignancy_map``, the largest
probability of the malignancy map that the classifier reads. Then the held-out scores pooled over the folds. This is the probe
that found the classifier reading the ROI map worse than its maximum alone (BENCHMARKS.md
section 7.1), which ``model.roi_evidence`` then closed.
Usage: python benchmarks/roi_readout_probe.py CV_REPEAT_DIR STRATEGY
(e.g. OUT/cv0/cv/repeat0 multitask; set LYMPHDX_CACHE to the compare's cache)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lymphdx.evaluation.evaluate import load_model
from lymphdx.training.distributed import DistContext
from lymphdx.training.propagation import WEAK, _my_batches
from lymphdx.training.trainer import load_run_data

READINGS = ("classifier", "roi_max", "roi_top20_mean", "roi_sum", "malignancy_max")


@torch.no_grad()
def readings(run: Path, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels ``(N,)`` and each reading ``(N,)`` of ``run``'s weak ``split``."""
    config, model, _ = load_model(run)
    volumes = load_run_data(config, run, need_strong=False).volumes("weak", split)
    out: dict[str, list[np.ndarray]] = {k: [] for k in READINGS}
    for images in _my_batches(model, volumes, 4, DistContext(), WEAK):
        pred = model(images, roi=True)
        p = torch.sigmoid(pred["roi"]).flatten(1)
        out["classifier"].append(torch.sigmoid(pred["cls"]).numpy())
        out["roi_max"].append(p.amax(1).numpy())
        out["roi_top20_mean"].append(p.topk(20, dim=1).values.mean(1).numpy())
        out["roi_sum"].append(p.sum(1).numpy())
        if "malignancy" in pred:
            out["malignancy_max"].append(pred["malignancy"].flatten(1).amax(1).sigmoid().numpy())
    return volumes.labels, {k: np.concatenate(v) for k, v in out.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("repeat", type=Path)
    parser.add_argument("strategy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pooled_y, pooled = [], {k: [] for k in READINGS}
    report: dict[str, object] = {}
    for run in sorted(args.repeat.glob(f"fold*/{args.strategy}/seed*")):
        fold = run.parts[-3]
        for split in ("train", "test"):
            y, r = readings(run, split)
            report[f"{fold} {split}"] = {k: round(roc_auc_score(y, v), 3) for k, v in r.items()}
            if split == "test":
                pooled_y.append(y)
                for k in r:
                    pooled[k].append(r[k])
    y = np.concatenate(pooled_y)
    report["pooled held-out"] = {
        k: round(roc_auc_score(y, np.concatenate(v)), 3) for k, v in pooled.items() if v
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
