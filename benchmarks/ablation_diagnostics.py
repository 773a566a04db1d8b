"""Why the ablation's arms score as they do: per arm, from the run folders of
``compare --ablation`` (``history.csv``, ``metrics.json``), averaged over folds × repeats:

* ``selected_epoch``: the epoch ``best.pt`` holds (``metrics.json``'s ``best_epoch``);
* ``val_auc_epoch_sd``: how much validation AUC jumps from epoch to epoch within a run
  (sd over epochs), i.e. how noisy the per-fold selection is;
* ``val_auc_max``: the best validation AUC a run saw (the optimism of selection on it);
* ``pseudo_pos_fraction_last``: the share of the strong set's pseudo class labels that
  are positive at the last propagation round (weighted arms: of those kept), to compare
  with the strong hospital's true prevalence (``synth.json``);
* ``pseudo_weight_mean_last``, ``pseudo_mask_voxel_fraction_last``: how much of the
  pseudo class labels and of the weak set's voxels the last round's targets use;
* ``strong_val_dice_max``: the best Dice of the ROI decoder on the strong validation split.

Usage: ``python benchmarks/ablation_diagnostics.py OUT/ablation [--data OUT/data]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return round(float(np.mean(kept)), 3) if kept else None


def _last(rows: list[dict[str, str]], key: str) -> float | None:
    values = [_float(r.get(key)) for r in rows]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def diagnose(folder: Path) -> dict[str, dict[str, float | int | None]]:
    per_arm: dict[str, dict[str, list[float | None]]] = {}
    for history in sorted(folder.glob("cv/repeat*/fold*/*/seed*/history.csv")):
        run = history.parent
        arm = run.parent.name
        with open(history, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not (run / "metrics.json").exists():
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        val = [v for v in (_float(r.get("val_auc")) for r in rows) if v is not None]
        dice = [v for v in (_float(r.get("strong_val_dice")) for r in rows) if v is not None]
        entry = per_arm.setdefault(arm, {})
        for key, value in (
            ("selected_epoch", float(metrics["best_epoch"])),
            ("val_auc_epoch_sd", float(np.std(val)) if len(val) > 1 else None),
            ("val_auc_max", max(val) if val else None),
            ("fold_test_auc", float(metrics["auc"])),
            ("pseudo_pos_fraction_last", _last(rows, "pseudo_pos_fraction")),
            ("pseudo_weight_mean_last", _last(rows, "pseudo_weight_mean")),
            ("pseudo_mask_voxel_fraction_last", _last(rows, "pseudo_mask_voxel_fraction")),
            ("strong_val_dice_max", max(dice) if dice else None),
        ):
            entry.setdefault(key, []).append(value)
    return {
        arm: {"runs": len(v["selected_epoch"]), **{k: _mean(x) for k, x in v.items()}}
        for arm, v in per_arm.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the compare --ablation output folder")
    parser.add_argument("--data", type=Path, help="the synthetic data folder (synth.json)")
    args = parser.parse_args()
    out: dict[str, object] = {"arms": diagnose(args.folder)}
    synth = args.data / "synth.json" if args.data else None
    if synth and synth.exists():
        hospitals = json.loads(synth.read_text())["hospitals"]
        out["strong_prevalence"] = round(hospitals["strong"]["p_metastatic"], 3)
        out["weak_prevalence"] = round(hospitals["weak"]["p_metastatic"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
