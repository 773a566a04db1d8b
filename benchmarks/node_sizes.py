"""How large are a data set's nodes on the quick preset's training grid?

For each data folder (``lymphdx synth`` output: ``DIR/weak/manifest.csv`` and
``DIR/strong/manifest.csv``), preprocesses the strong set's masks onto the quick grid
(through the cache) and prints ``node_size_status``: the node count and the median
equal-volume diameter in voxels and mm, and whether ``train.log`` would warn (and
``training.small_node_epochs`` raise the budget). All strong scans are read; a run reads
its training split only, so its ``train.log`` figure differs slightly.
Usage: python benchmarks/node_sizes.py DATA_DIR [DATA_DIR ...]   (BENCHMARKS.md section 1.4;
the dev log, docs/dev-log-2026-11-25_to_2026-12-03.md, section 7.2, seventh round; set
LYMPHDX_CACHE to reuse a compare's cache)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lymphdx.core.config import load_config
from lymphdx.data.manifest import load_manifests
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.engine.roi_status import node_size_status
from lymphdx.engine.run_data import cache_dir_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path, nargs="+")
    args = parser.parse_args()
    config = load_config()
    cache = PreprocessCache(cache_dir_of(config), config.data)
    report = {}
    for folder in args.data:
        _, strong = load_manifests(folder / "weak/manifest.csv", folder / "strong/manifest.csv")
        masks = (cache.mask(r.mask, r.image, r.patient_id) for r in strong)
        status = node_size_status(masks, config.data.spacing) or {}
        report[str(folder)] = {
            "n_nodes": status.get("n_nodes"),
            "median_diameter_voxels": round(status.get("median_diameter_voxels", 0.0), 2),
            "median_diameter_mm": round(status.get("median_diameter_mm") or 0.0, 2),
            "small_for_the_grid": bool(status.get("note")),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
