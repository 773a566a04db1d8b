"""Issue 29: keep a finished run's ROI maps of its weak scans, to try scan-level heads on
them without training again.

For every weak patient of the run (train, val and test splits), the run's ``best`` weights
score the scan as ``evaluate`` does (``evaluation.inferer``, ``tta_flip``): the
classifier's probability, the ROI map on the working grid and the image it was read from.
Each scan goes to ``OUT/<patient>.npz`` (the map as uint8 in 1/255 steps, the image in
float16, the voxel size in mm in (D, H, W) order, split and label); patients already there
are skipped, so the dump resumes. ``--domain strong`` stores the strong set's scans instead
(through the strong domain's path), each with its ROI mask on the working grid (``mask``,
uint8) and ``label`` 1 when the mask has a node.

    OMP_NUM_THREADS=1 python benchmarks/issue29_node_maps.py RUN OUT [--splits test]
    python benchmarks/issue29_node_maps.py RUN OUT --domain strong --splits train val
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lymphdx.core.domains import STRONG, WEAK
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.inferer import make_inferer
from lymphdx.engine.propagation import _my_batches
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model


def dump(
    run_dir: Path,
    out: Path,
    splits: tuple[str, ...] = ("train", "val", "test"),
    domain: str = "weak",
) -> None:
    config, model, _ = load_model(run_dir)
    data = load_run_data(config, run_dir, need_strong=domain == "strong")
    inferer, tta = make_inferer(config), config.evaluation.tta_flip
    voxel_mm = np.asarray(config.data.spacing[::-1], dtype=np.float32)  # (D, H, W)
    out.mkdir(parents=True, exist_ok=True)
    code = WEAK if domain == "weak" else STRONG
    for split in splits:
        volumes = data.volumes(domain, split, masks=domain == "strong")
        ids, labels = volumes.patient_ids, volumes.labels
        for i, pid in enumerate(ids):
            path = out / f"{pid}.npz"
            if path.exists():
                continue
            t0 = time.perf_counter()
            sub = type(volumes)([volumes.records[i]], volumes.cache, volumes.normalizer)
            with torch.no_grad():
                for images in _my_batches(model, sub, 1, DistContext(), code):
                    res = inferer(model, images, roi=True, flips=tta)
            roi = res["roi"][0, 0].numpy()
            tmp = out / f".{pid}.tmp.npz"
            extra = {}
            if labels is None:  # the strong set: its mask, and whether it has a node
                extra = {"mask": volumes.mask(i).astype(np.uint8)}
            label = int(labels[i]) if labels is not None else int(extra["mask"].any())
            np.savez_compressed(
                tmp,
                **extra,
                roi=np.round(roi * 255).astype(np.uint8),
                image=images[0, 0].cpu().numpy().astype(np.float16),
                voxel_mm=voxel_mm,
                cls=np.float64(res["cls"][0]),
                label=np.int64(label),
                split=split,
            )
            tmp.rename(path)
            print(f"{split} {pid} label {label} {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    ap.add_argument("--domain", choices=["weak", "strong"], default="weak")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dump(args.run, args.out, tuple(args.splits), args.domain)


if __name__ == "__main__":
    main()
