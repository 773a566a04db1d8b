"""Learning curves of a compare folder or a run folder: when has a run learned?

Draws the weak-validation AUC and the strong-validation Dice of every run against the
training steps (``lymphdx.reporting.curves``) into ``--out`` and prints, per strategy,
the final and the maximum value with the step they were reached (means over the runs) as
a markdown table, for pasting into BENCHMARKS.md. Reads ``history.csv`` only; trains
nothing.

Usage: ``python benchmarks/learning_curves.py FOLDER --out curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lymphdx.core.errors import LymphdxError  # noqa: E402
from lymphdx.reporting.curves import (  # noqa: E402
    find_runs,
    markdown_table,
    plot_learning_curves,
    read_curves,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a compare folder or a run folder")
    parser.add_argument(
        "--out", type=Path, required=True, help="the PNG to write (e.g. learning_curves.png)"
    )
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.folder)
        curves = read_curves(runs)
        if not curves:
            raise LymphdxError(f"no run under {args.folder} has a history.csv with rows yet")
        plot_learning_curves(curves, args.out)
    except LymphdxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = sum(len(v) for v in curves.values())
    print(f"{n} run(s) of {len(curves)} strategy(ies) from {args.folder}; figure: {args.out}\n")
    print(markdown_table(curves))
    print(
        "\nfinal: the last logged value; max: the highest; each the mean over the runs, "
        "with the mean step at which the runs reached it."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
