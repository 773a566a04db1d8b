"""Pooled out-of-fold AUC of a cross-validated compare at several epochs of the same runs.

The runs must keep every epoch's weights (``compare --cv K --pooled-selection`` trains
with ``training.keep_epochs``). With a constant learning rate nothing in a run depends on
its total length, so epoch E of a 14-epoch run is the final model of an E-epoch run: one
CV answers "would a shorter or longer budget do better?". Usage:
    python benchmarks/archive/oof_by_epoch.py CV_COMPARE_DIR --epochs 6 8 10 12 14
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lymphdx.stats.metrics import auc, bootstrap_auc_ci
from lymphdx.workflows.evaluate import predict_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--epochs", type=int, nargs="+", required=True, help="1-based epochs")
    args = parser.parse_args()
    out: dict[str, dict[str, list[float]]] = {}
    runs = sorted(args.folder.glob("cv/repeat*/fold*/*/seed*"))
    for strategy in sorted({r.parent.name for r in runs}):
        for epoch in args.epochs:
            by_repeat: dict[str, dict[str, tuple[int, float]]] = {}
            for run in (r for r in runs if r.parent.name == strategy):
                rows = predict_checkpoint(run, f"epoch_{epoch - 1:03d}")
                by_repeat.setdefault(f"{run.parents[2].name}/{run.name}", {}).update(rows)
            aucs = []
            for rows in by_repeat.values():
                y = np.array([v[0] for v in rows.values()])
                p = np.array([v[1] for v in rows.values()])
                aucs.append((auc(y, p), *bootstrap_auc_ci(y, p)))
            mean = np.mean(aucs, axis=0)
            out.setdefault(strategy, {})[f"epoch {epoch}"] = [round(float(x), 3) for x in mean]
    print(json.dumps({"folder": str(args.folder), "pooled_oof_auc [auc, ci_lo, ci_hi]": out}))


if __name__ == "__main__":
    main()
