"""Does averaging with the left-right flip (``evaluation.tta_flip``) help a trained model?

For every fold of a ``compare --cv`` repeat, loads the run's selected weights and scores
its held-out (test) weak patients twice: the classifier's probability on the scan, and
its mean with the probability on the scan mirrored left-right (x, the flip that
training's augmentation draws); likewise the mean of the 20 largest ROI probabilities.
Prints per-fold and pooled held-out AUCs. This is the probe behind the quick preset's
``evaluation.tta_flip: true`` (BENCHMARKS.md section 7.2, sixth round), run on the
development folds only; no weight is changed.
Usage: python benchmarks/tta_probe.py CV_REPEAT_DIR STRATEGY   (e.g. OUT/dev_evTM1/cv/repeat0
multitask; set LYMPHDX_CACHE to the compare's cache)
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
from lymphdx.training.teacher import predict_with_tta
from lymphdx.training.trainer import load_run_data


@torch.no_grad()
def readings(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels ``(N,)`` and each reading ``(N,)`` of ``run``'s held-out weak patients."""
    config, model, _ = load_model(run)
    volumes = load_run_data(config, run, need_strong=False).volumes("weak", "test")
    out: dict[str, list[np.ndarray]] = {}
    for images in _my_batches(model, volumes, 4, DistContext(), WEAK):
        for flips, tag in ((False, ""), (True, "+flip")):
            pred = predict_with_tta(model, images, roi=True, flips=flips)
            top = pred["roi"].flatten(1).sort(dim=1, descending=True).values[:, :20].mean(1)
            out.setdefault(f"classifier{tag}", []).append(pred["cls"].numpy())
            out.setdefault(f"roi_top20_mean{tag}", []).append(top.numpy())
    return volumes.labels, {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("repeat", type=Path)
    parser.add_argument("strategy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels: list[np.ndarray] = []
    pooled: dict[str, list[np.ndarray]] = {}
    report: dict[str, object] = {}
    for run in sorted(args.repeat.glob(f"fold*/{args.strategy}/seed*")):
        y, r = readings(run)
        report[run.parts[-3]] = {k: round(roc_auc_score(y, v), 3) for k, v in r.items()}
        labels.append(y)
        for k, v in r.items():
            pooled.setdefault(k, []).append(v)
    y = np.concatenate(labels)
    report["pooled held-out"] = {
        k: round(roc_auc_score(y, np.concatenate(v)), 3) for k, v in pooled.items()
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
