"""How good were a run's propagated labels? (synthetic data only: it knows the truth)

For an ``ssmdmt`` (or ``semi-supervised``) run folder, reads the last propagation's pseudo
labels from ``checkpoints/last.pt`` and scores them against what ``lymphdx synth`` knows:
- strong set: pseudo class labels vs "has a metastatic node" (``strong/nodes.csv``):
  accuracy, sensitivity, specificity, share called positive;
- weak set: pseudo ROI masks (> ζ) vs the true node masks (``weak_truth/masks``): Dice
  over the training scans, and the share of scans with a non-empty pseudo mask.
Usage: python benchmarks/archive/propagation_quality.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_checkpoint, load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    for run in args.runs:
        config = load_run_config(run)
        data = load_run_data(config, run)
        pseudo = load_checkpoint(run / "checkpoints" / "last.pt")["pseudo"]
        out: dict[str, object] = {"run": str(run), "propagation_epoch": pseudo["epoch"]}
        weak_dir = Path(config.manifests.weak).parent
        if pseudo["strong_targets"] is not None:
            nodes = weak_dir.parent / "strong" / "nodes.csv"
            metastatic = {
                r["patient_id"] for r in csv.DictReader(open(nodes)) if r["metastatic"] == "1"
            }
            strong = data.volumes("strong", "train")
            truth = np.array([pid in metastatic for pid in strong.patient_ids])
            called = pseudo["strong_targets"].numpy() >= 0.5
            out.update(
                strong_pseudo_accuracy=round(float((called == truth).mean()), 3),
                strong_pseudo_sensitivity=round(float(called[truth].mean()), 3),
                strong_pseudo_specificity=round(float((~called[~truth]).mean()), 3),
                strong_called_positive=round(float(called.mean()), 3),
                strong_truly_positive=round(float(truth.mean()), 3),
            )
        if pseudo["weak_masks"] is not None:
            weak = data.volumes("weak", "train")
            masks = pseudo["weak_masks"].numpy() > 0
            inter = total = 0.0
            for i, pid in enumerate(weak.patient_ids):
                truth_path = weak_dir.parent / "weak_truth" / "masks" / f"{pid}.nii.gz"
                t = data.cache.mask(truth_path, weak.records[i].image, pid) > 0
                inter += float((masks[i] & t).sum())
                total += float(masks[i].sum() + t.sum())
            out.update(
                weak_pseudo_mask_dice=round(2 * inter / max(total, 1.0), 3),
                weak_pseudo_mask_nonempty=round(
                    float(masks.reshape(len(masks), -1).any(1).mean()), 3
                ),
            )
        print(json.dumps(out))


if __name__ == "__main__":
    main()
