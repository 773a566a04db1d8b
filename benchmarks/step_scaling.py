"""A training step of the tile path against scan size: time and peak memory (issue 29).

    OMP_NUM_THREADS=2 python benchmarks/step_scaling.py              # 64^3 ... 512x512x256
    OMP_NUM_THREADS=1 python benchmarks/step_scaling.py --threads 1 --steps 3

One step of the ``clinical`` preset's recipe (``training.sampler: tiles``) as the trainer
runs it, on a scan of each size held in a memory-mapped ``.npy`` (as the preprocessing
cache holds a large scan): ``batch_size`` weak scans each read as a bag of
``inference.bag_tiles`` + ``training.bag_random`` tiles (``BagSampler.load``: the crop, the
augmentation), ``strong_batch_size`` ROI patches of ``training.roi_patch`` cut from a
strong scan of the same size, then ``MultiTaskNet.bags`` + the ROI patches' forward, the
classification and ROI losses, backward and an AdamW step. Random weights and volumes: the
cost does not depend on them. Each size runs in a fresh interpreter (its own peak RSS).
Step cost must stay flat in the scan's size: the median of ``--steps`` steps after one
warm-up step, the loading separately.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

SIZES = [  # (x, y, z)
    (64, 64, 64),
    (128, 128, 64),
    (256, 256, 128),
    (512, 512, 128),
    (512, 512, 256),
]


class _Scans:
    """What ``BagSampler`` reads of a ``VolumeSet``: ``image(i)`` and ``normalizer``."""

    def __init__(self, array) -> None:
        self.array = array

    def image(self, i: int):
        return self.array

    @staticmethod
    def normalizer(x):
        return x


def child(size: tuple[int, int, int], threads: int, steps: int) -> dict:
    """One size, measured in this process."""
    import numpy as np
    import torch

    from lymphdx.core.config import load_config
    from lymphdx.data.augment import Augmenter
    from lymphdx.data.sampling import patch_corner
    from lymphdx.data.tile_sampler import crop_padded
    from lymphdx.engine.bag_sampler import BagSampler
    from lymphdx.engine.losses import RoiLoss, classification_loss
    from lymphdx.models.multitask import build_model

    torch.set_num_threads(threads)
    config = load_config(preset="clinical", overrides={"strategy": "multitask"})
    t = config.training
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    augmenter = Augmenter(t.augmentation)
    roi_loss = RoiLoss()
    x, y, z = size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.npy"
        np.save(path, rng.normal(size=(z, y, x)).astype(np.float32))
        scan = np.load(path, mmap_mode="r")  # as the cache returns a large scan
        mask = np.zeros((z, y, x), np.uint8)
        mask[z // 2 - 2 : z // 2 + 2, y // 2 - 3 : y // 2 + 3, x // 2 - 3 : x // 2 + 3] = 1
        nodes = np.argwhere(mask)
        volumes = _Scans(scan)
        bags = BagSampler(config)
        centres = np.array([[z // 2, y // 2, x // 2], [z // 3, y // 3, x // 3]])
        bags.centres["weak"] = [centres]
        patch = tuple(reversed(t.roi_patch))
        rss_model = _bench.rss_kib()
        load_s, step_s = [], []
        for step in range(steps + 1):
            t0 = time.perf_counter()
            tiles, sizes = [], []
            for k in range(t.batch_size):
                bag = bags.load(volumes, "weak", 0, (0, 0, step, 0, k), {}, augmenter)
                tiles += [b["image"] for b in bag]
                sizes.append(len(bag))
            patches, targets = [], []
            for k in range(t.strong_batch_size):
                key = (0, 0, step, 2, k)
                corner = patch_corner(
                    mask, patch, t.roi_foreground, np.random.default_rng(key), nodes
                )
                cut = augmenter(
                    key,
                    {
                        "image": crop_padded(scan, corner, patch),
                        "mask": crop_padded(mask, corner, patch),
                    },
                )
                patches.append(cut["image"])
                targets.append(cut["mask"])
            images = torch.from_numpy(np.stack(tiles)[:, None].copy())
            patch_t = torch.from_numpy(np.stack(patches)[:, None].copy())
            mask_t = torch.from_numpy(np.stack(targets)[:, None].copy())
            labels = torch.tensor([0.0, 1.0] * (t.batch_size // 2) + [1.0] * (t.batch_size % 2))
            t1 = time.perf_counter()
            out = model.bags(images, sizes)
            roi = model(patch_t)["roi"]
            loss = classification_loss(out["cls"], labels) + roi_loss(roi, mask_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            t2 = time.perf_counter()
            if step > 0:  # the first step warms up allocators and kernels
                load_s.append(t1 - t0)
                step_s.append(t2 - t1)
        # the FLOPs of the last step's forward + backward and of one inference tile's
        # forward (torch.utils.flop_counter): what a GPU budget is estimated from
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = model.bags(images, sizes)
            roi = model(patch_t)["roi"]
            (classification_loss(out["cls"], labels) + roi_loss(roi, mask_t)).backward()
        step_gflop = counter.get_total_flops() / 1e9
        tile = torch.zeros((1, 1, *reversed(config.inference.tile)))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(tile)
        tile_gflop = counter.get_total_flops() / 1e9
        return {
            "size_xyz": list(size),
            "gflop_per_step": round(step_gflop, 2),
            "gflop_per_inference_tile": round(tile_gflop, 3),
            "megavoxels": round(x * y * z / 1e6, 3),
            "tiles_per_step": len(tiles) + len(patches),
            "tile_xyz": list(config.inference.tile),
            "seconds": {
                "load_median": round(_bench.median(load_s), 3),
                "forward_backward_median": round(_bench.median(step_s), 3),
                "step_median": round(
                    _bench.median([a + b for a, b in zip(load_s, step_s, strict=True)]), 3
                ),
            },
            "rss_after_model_gib": round(rss_model / 2**20, 3),
            "peak_rss_gib": round(_bench.peak_rss_kib() / 2**20, 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per size (after one)")
    ap.add_argument("--max-voxels", type=float, default=float("inf"), help="skip larger sizes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _bench.emit(child(tuple(args.size), args.threads, args.steps))
        return
    results = []
    for size in SIZES:
        if size[0] * size[1] * size[2] > args.max_voxels:
            continue
        _bench.log(f"size {size} ...")
        res = _bench.run_child(
            Path(__file__),
            ["--size", *map(str, size), "--threads", str(args.threads), "--steps", str(args.steps)],
        )
        _bench.log(f"  step {res['seconds']['step_median']} s, peak {res['peak_rss_gib']} GiB")
        results.append(res)
    _bench.emit(
        {"benchmark": "step_scaling", "machine": _bench.machine(args.threads), "results": results}
    )


if __name__ == "__main__":
    main()
