"""Rerun a finished run with one or more config keys changed, on the same splits.

A run folder's ``config.yaml`` and ``splits.csv`` fix it; this copies the splits into
OUT, applies ``--set section.key=value`` (the value read as YAML) to the config and trains
and evaluates OUT as ``compare`` does (``run_one``), so that the two runs differ only in
those keys. Used for the Dice-gate latch reruns of section 7.3 of
docs/dev-log-2026-11-25_to_2026-12-03.md.
Usage: python benchmarks/archive/rerun_run.py RUN OUT --set propagation.dice_gate_latch=true
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from lymphdx.core.config import validate
from lymphdx.workflows.compare import run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--set", dest="changes", action="append", default=[], required=True)
    args = parser.parse_args()
    raw = yaml.safe_load((args.run / "config.yaml").read_text())
    for change in args.changes:
        dotted, _, value = change.partition("=")
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = yaml.safe_load(value)
    config = validate(raw, f"{args.run / 'config.yaml'} with {args.changes}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "splits.csv").exists():
        shutil.copy(args.run / "splits.csv", args.out / "splits.csv")
    manifests = raw["manifests"]
    run_one(config, args.out, Path(manifests["weak"]), Path(manifests["strong"]), progress=False)
    print(f"{args.out}: done")


if __name__ == "__main__":
    main()
