"""Print a compare folder's results as JSON: AUCs with CIs, detection, paired tests, and
the training time per run (from each run's history.csv). Usage:
    python benchmarks/summarise_compare.py COMPARE_DIR [--seconds WALL]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

KEEP = ("test_auc", "test_auc_mean", "test_auc_ci95", "fold_auc_mean", "fold_auc_sd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seconds", type=int, default=None, help="wall time of the compare")
    args = parser.parse_args()
    results = json.loads((args.folder / "results.json").read_text())
    train_s = [
        sum(float(r["seconds"]) for r in csv.DictReader(open(h)))
        for h in args.folder.glob("**/history.csv")
    ]
    summary = {
        "folder": str(args.folder),
        "wall_seconds": args.seconds,
        "runs": len(train_s),
        "training_seconds_per_run_mean": round(sum(train_s) / max(len(train_s), 1), 1),
        "strategies": {
            name: {
                **{k: v[k] for k in KEEP if k in v},
                **{
                    k: v.get("detection", {}).get(k)
                    for k in (
                        "strong_test_dice_mean",
                        "strong_test_froc_mean_sensitivity_mean",
                        "weak_test_dice_mean",
                        "weak_test_froc_mean_sensitivity_mean",
                    )
                    if v.get("detection", {}).get(k) is not None
                },
            }
            for name, v in results["strategies"].items()
        },
        "paired_tests": {
            name: {
                **{
                    k: t.get(k)
                    for k in ("delta_auc", "delta_ci95", "p_delong", "p_holm", "supports_claim")
                },
                # the design analysis at the declared effect (results.json's claim_rule)
                **{
                    f"design_{k}": (t.get("design") or {}).get(k)
                    for k in ("power", "exaggeration", "n_for_80_power")
                },
            }
            for name, t in results.get("paired_tests", {}).items()
        },
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
