"""Calibration of a ``compare --cv`` folder, per strategy: calibration intercept, slope,
Brier score and ECE before → after recalibration (cross-fitted over the folds), with
their 95% bootstrap intervals, and the sensitivity and specificity at the operating point
with Wilson intervals, as Markdown (for BENCHMARKS.md). Usage:
    python benchmarks/calibration_cv.py COMPARE_OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lymphdx.reporting.calibration import calibration_markdown


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the Markdown table of ``COMPARE_OUT/results.json``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, help="a compare --cv output folder")
    args = parser.parse_args(argv)
    results = json.loads((args.folder / "results.json").read_text())
    calibration = results.get("calibration")
    if not calibration:
        sys.exit(f"{args.folder / 'results.json'} has no calibration (a compare before it?)")
    mode = f"{results.get('mode')}, {results.get('cv')} folds, {results.get('repeats', 1)} repeats"
    text = f"Calibration of {args.folder} ({mode}; n = {results.get('n_test')}):\n\n"
    text += calibration_markdown(calibration).removeprefix("## Calibration and operating point\n\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
