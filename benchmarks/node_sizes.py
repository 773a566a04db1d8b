"""How large are a data set's nodes on the quick preset's training grid (and on finer ones)?

For each data folder (``lymphdx synth`` output: ``DIR/weak/manifest.csv`` and
``DIR/strong/manifest.csv``), preprocesses the strong set's masks onto the quick grid
(through the cache) and prints ``node_size_status``: the node count and the median
equal-volume diameter in voxels and mm, and whether ``train.log`` would warn (and
``training.small_node_epochs`` raise the budget). All strong scans are read; a run reads
its training split only, so its ``train.log`` figure differs slightly.

``--spacing MM`` (repeatable) does the same on an isotropic grid of MM with the quick
preset's field of view (240 x 240 x 192 mm), e.g. 1.5 for the clinical preset's working
spacing. Where the folder has the phantom's ``nodes.csv`` (strong and weak_truth), it also
prints, per class, the nodes' short and long axes (mm), roundness, margin irregularity,
necrosis and the mean HU of their masks as written (issue 29's realistic phantom).

Usage: python benchmarks/node_sizes.py DATA_DIR [DATA_DIR ...] [--spacing 1.5 ...]
(BENCHMARKS.md section 1.4; the dev log, docs/dev-log-2026-11-25_to_2026-12-03.md, section
7.2, seventh round; set LYMPHDX_CACHE to reuse a compare's cache)
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from lymphdx.core.config import load_config
from lymphdx.data.manifest import load_manifests
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.engine.roi_status import node_size_status
from lymphdx.engine.run_data import cache_dir_of

QUICK_FOV_MM = (240.0, 240.0, 192.0)  # the quick preset's crop: 48 x 48 x 32 of 5 x 5 x 6 mm


def grid_status(folder: Path, overrides: dict | None) -> dict:
    """``node_size_status`` of the strong set's masks on the quick grid or an override."""
    config = load_config(overrides=overrides)
    cache = PreprocessCache(cache_dir_of(config), config.data)
    _, strong = load_manifests(folder / "weak/manifest.csv", folder / "strong/manifest.csv")
    masks = (cache.mask(r.mask, r.image, r.patient_id) for r in strong)
    status = node_size_status(masks, config.data.spacing) or {}
    return {
        "spacing_mm": list(config.data.spacing),
        "n_nodes": status.get("n_nodes"),
        "median_diameter_voxels": round(status.get("median_diameter_voxels", 0.0), 2),
        "median_diameter_mm": round(status.get("median_diameter_mm") or 0.0, 2),
        "small_for_the_grid": bool(status.get("note")),
    }


def node_table(folder: Path) -> dict | None:
    """Per class, from the phantom's ``nodes.csv`` files (both sets): medians of the
    axes, means of the rest; None where the folder has none."""
    rows: list[dict[str, str]] = []
    for part in ("strong", "weak_truth"):
        path = folder / part / "nodes.csv"
        if path.exists():
            with open(path, newline="") as f:
                rows.extend(csv.DictReader(f))
    if not rows:
        return None
    out: dict = {}
    for name, flag in (("benign", "0"), ("metastatic", "1")):
        mine = [r for r in rows if r["metastatic"] == flag]

        def col(key: str, mine=mine) -> np.ndarray:
            return np.array([float(r[key]) for r in mine if r.get(key) not in (None, "")])

        short, long = col("short_axis_mm"), col("long_axis_mm")
        out[name] = {
            "n": len(mine),
            "median_short_axis_mm": round(float(np.median(short)), 2) if short.size else None,
            "short_axis_under_10mm": round(float(np.mean(short < 10)), 3) if short.size else None,
            "median_long_axis_mm": round(float(np.median(long)), 2) if long.size else None,
            "median_diameter_mm": round(float(np.median(col("diameter_mm"))), 2),
            "mean_roundness": round(float(col("roundness").mean()), 3),
            "irregular_margin": round(float(np.mean(col("margin_irregularity") > 0)), 3)
            if col("margin_irregularity").size
            else None,
            "necrotic": round(float(col("necrotic").mean()), 3),
            "mean_hu": round(float(col("mean_hu").mean()), 1),
        }
    if out["benign"]["n"] and out["metastatic"]["n"]:
        out["mean_hu_metastatic_minus_benign"] = round(
            out["metastatic"]["mean_hu"] - out["benign"]["mean_hu"], 1
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument(
        "--spacing",
        type=float,
        action="append",
        default=[],
        help="also an isotropic grid of this spacing (mm) with the quick field of view",
    )
    args = parser.parse_args()
    report = {}
    for folder in args.data:
        entry: dict = {"quick_grid": grid_status(folder, None)}
        for mm in args.spacing:
            shape = [max(1, round(f / mm)) for f in QUICK_FOV_MM]
            over = {"data": {"spacing": [mm, mm, mm], "shape": shape}}
            entry[f"grid_{mm:g}mm"] = grid_status(folder, over)
        table = node_table(folder)
        if table is not None:
            entry["nodes_csv"] = table
        report[str(folder)] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
