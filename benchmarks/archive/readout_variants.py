"""Which reading of the ROI map to fit beside the classifier (the dev log,
docs/dev-log-2026-11-25_to_2026-12-03.md section 7.2, twelfth round): for each fold
of a ``compare --cv`` repeat, fit a logistic regression on the fold's weak training
patients (train + val) and score its held-out patients.

Variants: the logit of the mean of the k largest ROI probabilities alone (``topK``) and
averaged with the classifier, as probabilities (``avg_topK``) or as logits
(``lavg_topK``); and the regression on all of them plus the maximum and the log of the
sum (``multi``, standardised, C = 0.3), alone and averaged (``avg_multi``: what
``evaluation.roi_readout`` became). ``cls``: the classifier alone. The top-k readings
and the classifier are averaged with the left-right flip (``--flip`` of
``roi_readout_probe.py``), the maximum and the sum are not. Prints the pooled held-out
AUC of each, per strategy.
Usage: python benchmarks/archive/readout_variants.py CV_REPEAT_DIR [CV_REPEAT_DIR ...]
(e.g. OUT/dev_top1/cv/repeat0; set LYMPHDX_CACHE to the compare's cache)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from roi_readout_probe import readings  # noqa: E402

KS = [5, 10, 20, 40, 80]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fold_scores(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Held-out labels ``(N,)`` and each variant's scores ``(N,)`` of one fold's run."""
    train = [readings(run, s, KS, True) for s in ("train", "val")]
    y_te, te = readings(run, "test", KS, True)
    y_tr = np.concatenate([t[0] for t in train])
    f_tr = {k: np.concatenate([t[1][k] for t in train]) for k in te}
    cls = te["classifier+flip"]
    out = {"cls": cls}
    for k in KS:
        key = f"roi_top{k}_mean+flip"
        lr = LogisticRegression(C=1.0).fit(logit(f_tr[key])[:, None], y_tr)
        p = lr.predict_proba(logit(te[key])[:, None])[:, 1]
        out[f"top{k}"] = p
        out[f"avg_top{k}"] = 0.5 * (p + cls)
        out[f"lavg_top{k}"] = 0.5 * (logit(p) + logit(cls))
    names = [f"roi_top{k}_mean+flip" for k in KS] + ["roi_max", "roi_sum"]

    def x(f: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([np.log1p(f[n]) if n == "roi_sum" else logit(f[n]) for n in names], 1)

    mu, sd = x(f_tr).mean(0), x(f_tr).std(0) + 1e-6
    lr = LogisticRegression(C=0.3).fit((x(f_tr) - mu) / sd, y_tr)
    p = lr.predict_proba((x(te) - mu) / sd)[:, 1]
    out["multi"] = p
    out["avg_multi"] = 0.5 * (p + cls)
    return y_te, out


def main() -> None:
    torch.set_num_threads(1)
    report = {}
    for repeat in sys.argv[1:]:
        for strategy in ("multitask", "ssmdmt"):
            ys, scores = [], {}
            for run in sorted(Path(repeat).glob(f"fold*/{strategy}/seed*")):
                y, out = fold_scores(run)
                ys.append(y)
                for k, v in out.items():
                    scores.setdefault(k, []).append(v)
            y = np.concatenate(ys)
            report[f"{repeat} {strategy}"] = {
                k: round(roc_auc_score(y, np.concatenate(v)), 3) for k, v in scores.items()
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
