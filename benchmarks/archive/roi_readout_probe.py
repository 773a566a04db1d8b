"""How well does each reading of a trained model separate the weak set's patients?

For every fold of a ``compare --cv`` repeat, loads the run's selected weights and scores,
on its training and its held-out (test) weak patients, the classifier's probability
against readings of its ROI map: the largest ROI probability, the mean of the k largest
(``--top-k``, default 20: a soft volume of the scan's largest nodes), and the sum; and,
for a model with ``model.malignancy_map``, the largest probability of the malignancy map
that the classifier reads. Then the held-out scores pooled over the folds. This is the
probe that found the classifier reading the ROI map worse than its maximum alone
(docs/dev-log-2026-11-25_to_2026-12-03.md section 7.1), which
``model.roi_evidence`` then closed, and the top-k reading of section 7.2's fourth round;
``--flip`` is the sixth round's probe of ``evaluation.tta_flip``.
Usage: python benchmarks/archive/roi_readout_probe.py CV_REPEAT_DIR STRATEGY [--top-k 5 10 20]
[--held-out-only] [--flip]   (e.g. OUT/cv0/cv/repeat0 multitask; set LYMPHDX_CACHE to the
compare's cache)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lymphdx.core.domains import WEAK
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.propagation import _my_batches
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.engine.teacher import predict_with_tta


@torch.no_grad()
def readings(
    run: Path, split: str, top_k: list[int], flip: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels ``(N,)`` and each reading ``(N,)`` of ``run``'s weak ``split``; with ``flip``
    also the classifier and the top-k means averaged with the left-right mirror
    (``predict_with_tta``, as ``evaluation.tta_flip`` scores)."""
    config, model, _ = load_model(run)
    volumes = load_run_data(config, run, need_strong=False).volumes("weak", split)
    out: dict[str, list[np.ndarray]] = {}
    for images in _my_batches(model, volumes, 4, DistContext(), WEAK):
        pred = model(images, roi=True)
        p = torch.sigmoid(pred["roi"]).flatten(1)
        ranked = p.sort(dim=1, descending=True).values
        scores = {"classifier": torch.sigmoid(pred["cls"]), "roi_max": ranked[:, 0]}
        for k in top_k:
            scores[f"roi_top{k}_mean"] = ranked[:, :k].mean(1)
        scores["roi_sum"] = p.sum(1)
        if "malignancy" in pred:
            scores["malignancy_max"] = pred["malignancy"].flatten(1).amax(1).sigmoid()
        if flip:
            both = predict_with_tta(model, images, roi=True, flips=True)
            top = both["roi"].flatten(1).sort(dim=1, descending=True).values
            scores["classifier+flip"] = both["cls"]
            for k in top_k:
                scores[f"roi_top{k}_mean+flip"] = top[:, :k].mean(1)
        for name, v in scores.items():
            out.setdefault(name, []).append(v.numpy())
    return volumes.labels, {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("repeat", type=Path)
    parser.add_argument("strategy")
    parser.add_argument("--top-k", type=int, nargs="+", default=[20])
    parser.add_argument("--held-out-only", action="store_true", help="skip the training folds")
    parser.add_argument(
        "--flip", action="store_true", help="also the readings averaged with the left-right flip"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    pooled_y: list[np.ndarray] = []
    pooled: dict[str, list[np.ndarray]] = {}
    report: dict[str, object] = {}
    for run in sorted(args.repeat.glob(f"fold*/{args.strategy}/seed*")):
        fold = run.parts[-3]
        for split in ("test",) if args.held_out_only else ("train", "test"):
            y, r = readings(run, split, args.top_k, args.flip)
            report[f"{fold} {split}"] = {k: round(roc_auc_score(y, v), 3) for k, v in r.items()}
            if split == "test":
                pooled_y.append(y)
                for k, v in r.items():
                    pooled.setdefault(k, []).append(v)
    y = np.concatenate(pooled_y)
    report["pooled held-out"] = {
        k: round(roc_auc_score(y, np.concatenate(v)), 3) for k, v in pooled.items()
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
