"""Issue 29: score a finished run again with other settings read after training, and pool
runs' test predictions against a reference (BENCHMARKS.md §4.2, §4.6).

``copy`` copies what scoring needs of run ``RUN`` to ``DST`` (weights, config, splits,
normalisation, the decoder's status, history and log; not its scores), sets the
``evaluation`` keys given (``--set readout=nodes --set readout_weight=1``: the clinical
preset's node readout), and scores ``DST``'s weak test split as ``lymphdx evaluate``
does (the strong set's test split only with ``--detection``: since 2026-12-08 not by
default, so that a choice made on development folds never reads it). ``pool`` gives the pooled AUC
with its bootstrap CI of each group of ``predictions_test.csv`` files (a comma-separated
list per group, e.g. the folds of a CV), on the patients all groups share, and DeLong's
paired test of each group against the first.

    python benchmarks/issue29_rescore.py copy RUN DST --set readout=nodes --set readout_weight=1
    python benchmarks/issue29_rescore.py pool "a/fold0/p.csv,a/fold1/p.csv" "b/fold0/p.csv,..."
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import yaml

from lymphdx.stats.metrics import auc, bootstrap_auc_ci, delong_paired
from lymphdx.workflows.evaluate import evaluate_run, read_predictions

KEEP = (
    "checkpoints",
    "config.yaml",
    "normalization.json",
    "splits.csv",
    "roi_status.json",
    "history.csv",
    "train.log",
)


def copy_and_score(run: Path, dst: Path, settings: list[str], detection: bool = False) -> dict:
    """``run`` copied to ``dst`` with ``evaluation`` ``settings`` (``key=value``), scored
    (with ``detection``, also on the strong set's test split)."""
    if dst.exists():
        raise SystemExit(f"{dst} exists")
    dst.mkdir(parents=True)
    for name in KEEP:
        src = run / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.exists():
            shutil.copy2(src, dst / name)
    config = yaml.safe_load((dst / "config.yaml").read_text())
    for item in settings:
        key, value = item.split("=", 1)
        config.setdefault("evaluation", {})[key] = yaml.safe_load(value)
    (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return evaluate_run(dst, "test", detection=detection)


def pool(groups: list[str]) -> None:
    """Pooled AUC of each group of prediction files on the patients all groups share."""
    rows = []
    for group in groups:
        r: dict = {}
        for path in group.split(","):
            r.update(read_predictions(Path(path)))
        rows.append(r)
    common = sorted(set.intersection(*(set(r) for r in rows)))
    y = np.array([rows[0][p][0] for p in common])
    first = np.array([rows[0][p][1] for p in common])
    print(f"{len(common)} patients, {int(y.sum())} positive")
    for group, r in zip(groups, rows, strict=True):
        s = np.array([r[p][1] for p in common])
        lo, hi = bootstrap_auc_ci(y, s[None], 2000, 0.95, 0)
        line = f"AUC {auc(y, s):.3f} [{lo:.3f}, {hi:.3f}]"
        if r is not rows[0]:
            d = delong_paired(y, s, first)
            line += f"; against the first: {d.delta:+.3f}, DeLong p = {d.p:.3f}"
        print(f"{line}  <- {group}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("copy")
    c.add_argument("run", type=Path)
    c.add_argument("dst", type=Path)
    c.add_argument("--set", action="append", default=[], help="evaluation KEY=VALUE")
    c.add_argument(
        "--detection", action="store_true", help="also the strong test split (never for choices)"
    )
    p = sub.add_parser("pool")
    p.add_argument("groups", nargs="+")
    args = parser.parse_args()
    if args.what == "copy":
        m = copy_and_score(args.run, args.dst, args.set, args.detection)
        print(f"AUC {m['auc']:.3f} {m['auc_ci95']}; readout {m.get('roi_readout')}")
    else:
        pool(args.groups)


if __name__ == "__main__":
    main()
