"""Sliding-window inference against scan size: time and peak memory (issue 29's cost curve).

    OMP_NUM_THREADS=2 python benchmarks/inference_scaling.py            # 64^3 ... 512x512x256
    OMP_NUM_THREADS=1 python benchmarks/inference_scaling.py --threads 1 --max-voxels 8.4e6
    OMP_NUM_THREADS=1 python benchmarks/inference_scaling.py --threads 1 --preset clinical

``SlidingWindowInferer`` (``evaluation.inferer: sliding_window``, the default ``inference``
section: tile 96 x 96 x 64, overlap 0.25, Gaussian blending, 4 tiles per forward pass, a bag
of 4 peak tiles; ``--preset clinical``: that preset's, tiles of 64 x 64 x 32 and a bag of 8
tiles of 32 x 32 x 16) with the preset's network (random weights: the cost does not depend
on them) on one random volume per size. Each size runs in a fresh interpreter, so its peak
resident memory (VmHWM, ``_bench.peak_rss_kib``) is its own; the resident memory after the
model is built is given too. Wall times (and the process's CPU times, steadier on a shared
machine): the blended ROI map (``roi_map``), the peaks and the bag's tiles (``peaks``), the
classifier on the bag (``bag``), and their sum; ``--flip`` adds the left-right flip (twice
the tiles). Prints one JSON object; seconds per million voxels, and CPU seconds per tile
run, say whether time grows linearly in voxels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

SIZES = [  # (x, y, z)
    (64, 64, 64),
    (128, 128, 64),
    (128, 128, 128),
    (256, 256, 128),
    (512, 512, 128),
    (512, 512, 256),
]


def child(size: tuple[int, int, int], threads: int, flip: bool, preset: str = "quick") -> dict:
    """One size, measured in this process."""
    import torch

    from lymphdx.core.config import load_config
    from lymphdx.engine.inferer import SlidingWindowInferer
    from lymphdx.models.multitask import build_model

    torch.set_num_threads(threads)
    config = load_config(preset=preset, overrides={"evaluation": {"inferer": "sliding_window"}})
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    inferer = SlidingWindowInferer(config.inference)
    x, y, z = size
    image = torch.randn(1, 1, z, y, x)
    rss_model = _bench.rss_kib()
    seen: list[int] = []  # tiles through the encoder, per forward pass
    model.encoder.register_forward_pre_hook(lambda _m, a: seen.append(len(a[0])))
    with torch.no_grad():
        c0, t0 = time.process_time(), time.perf_counter()
        prob = inferer.roi_map(model, image, flip)
        c1, t1 = time.process_time(), time.perf_counter()
        windows = sum(seen)
        tiles = inferer.bag_tiles(image, prob[0, 0])
        t2 = time.perf_counter()
        views = [tiles, tiles.flip(-1)] if flip else [tiles]
        cls = sum(torch.sigmoid(inferer.bag_logit(model, v)) for v in views) / len(views)
        c3, t3 = time.process_time(), time.perf_counter()
    return {
        "size_xyz": list(size),
        "megavoxels": round(x * y * z / 1e6, 3),
        "tiles_run": windows,  # by the sliding window (both views with the flip)
        "bag_tiles": int(len(tiles)),
        "seconds": {
            "roi_map": round(t1 - t0, 2),
            "peaks": round(t2 - t1, 2),
            "bag": round(t3 - t2, 2),
            "total": round(t3 - t0, 2),
        },
        # CPU time of this process (all its threads): what the work costs, less sensitive
        # than the wall time to other processes on a shared machine
        "cpu_seconds": {"roi_map": round(c1 - c0, 2), "total": round(c3 - c0, 2)},
        "rss_after_model_gib": round(rss_model / 2**20, 3),
        "peak_rss_gib": round(_bench.peak_rss_kib() / 2**20, 3),
        "probability": round(float(cls), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-voxels", type=float, default=float("inf"), help="skip larger sizes")
    ap.add_argument("--flip", action="store_true", help="with the left-right flip (TTA)")
    ap.add_argument(
        "--preset", default="quick", help="whose network and inference section (quick, clinical)"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _bench.emit(child(tuple(args.size), args.threads, args.flip, args.preset))
        return
    results = []
    for size in SIZES:
        if size[0] * size[1] * size[2] > args.max_voxels:
            continue
        _bench.log(f"size {size} ...")
        extra = (["--flip"] if args.flip else []) + ["--preset", args.preset]
        res = _bench.run_child(
            Path(__file__), ["--size", *map(str, size), "--threads", str(args.threads), *extra]
        )
        _bench.log(f"  {res['seconds']['total']} s, peak {res['peak_rss_gib']} GiB")
        results.append(res)
    for r in results:
        r["seconds_per_megavoxel"] = round(r["seconds"]["total"] / r["megavoxels"], 3)
        r["cpu_seconds_per_tile"] = round(r["cpu_seconds"]["roi_map"] / r["tiles_run"], 3)
    _bench.emit(
        {
            "benchmark": "inference_scaling",
            "machine": _bench.machine(args.threads),
            "flip": args.flip,
            "preset": args.preset,
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
