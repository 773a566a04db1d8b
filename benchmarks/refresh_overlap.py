"""What the bag refresh's sliding-window overlap buys (issue 29; BENCHMARKS.md §4.3).

The refresh (``training.sampler: tiles``) maps every weak training scan with the
teacher's decoder to place each bag's tiles on the map's ``inference.bag_tiles`` highest
separated peaks. It is most of a clinical run's time. This script maps the first ``--n``
weak training scans of a finished run with its ``best.pt`` at each ``--overlaps`` value
(no flip, as the refresh) and reports the time per scan and how many of the reference
overlap's peaks (the first value; the preset's 0.25) the others find again within half a
bag tile along every axis: the same candidate region, so the same tile in the bag.

    OMP_NUM_THREADS=1 python benchmarks/refresh_overlap.py RUN --n 10 --overlaps 0.25 0

One JSON line per overlap. Reads the run, writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lymphdx.engine.candidates import peaks  # noqa: E402
from lymphdx.engine.inferer import SlidingWindowInferer  # noqa: E402
from lymphdx.engine.run_data import load_run_data  # noqa: E402
from lymphdx.engine.run_folder import load_model  # noqa: E402

Peaks = list[tuple[int, ...]]


def matched(reference: Peaks, other: Peaks, half: np.ndarray) -> int:
    """How many of ``reference``'s peaks have a peak of ``other`` closer than ``half``
    voxels along every axis."""
    if not other:
        return 0
    b = np.array(other)
    return sum(bool((np.abs(b - np.array(a)) < half).all(1).any()) for a in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=10, help="weak training scans")
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.0])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config, model, _ = load_model(args.run, "best")
    data = load_run_data(config, args.run, need_strong=False)
    scans = data.volumes("weak", "train")
    n = min(args.n, len(scans))
    x, y, z = config.inference.bag_tile or config.inference.tile
    tile = np.array([z, y, x])
    separation = [max(1, int(t) // 2) for t in tile]
    found: dict[float, list[Peaks]] = {}
    for overlap in args.overlaps:
        inferer = SlidingWindowInferer(config.inference.model_copy(update={"overlap": overlap}))
        seconds, per_scan = 0.0, []
        for i in range(n):
            image = torch.from_numpy(np.ascontiguousarray(scans.image(i)))[None, None]
            start = time.perf_counter()
            with torch.no_grad():
                prob = inferer.roi_map(model, image, flips=False)[0, 0].numpy()
            per_scan.append(peaks(prob, config.inference.bag_tiles, separation))
            seconds += time.perf_counter() - start
        found[overlap] = per_scan
        ref = found[args.overlaps[0]]
        hits = sum(matched(a, b, tile / 2) for a, b in zip(ref, per_scan, strict=True))
        total = sum(len(a) for a in ref)
        print(
            json.dumps(
                {
                    "overlap": overlap,
                    "scans": n,
                    "grid": list(scans.image(0).shape),
                    "s_per_scan": round(seconds / n, 3),
                    "reference_peaks_found": f"{hits}/{total}",
                    "share": round(hits / max(total, 1), 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
