"""How fast does the quick preset's ROI decoder leave "background everywhere"?

Trains the decoder alone on the strong set's node-oversampled patches (the ROI warm-up
of the quick recipe, outside the trainer) and prints, every ``--eval-every`` steps, the
ROI loss, the strong-validation Dice (at 0.5) and the weak-validation AUC of the maximum
ROI probability per scan. ``--bias`` overrides the output bias that ``build_model`` sets
to the node prior (−4.6): ``--bias 0`` reproduces the old plateau (§7.1 of
docs/dev-log-2026-11-25_to_2026-12-03.md).
Usage:
    python benchmarks/archive/roi_warmup_probe.py DATA_DIR [--steps 600] [--bias 0]
        [--patch 32 32 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lymphdx.core.config import load_config, validate
from lymphdx.data.sampling import patch_corner
from lymphdx.data.tile_sampler import crop_padded as crop
from lymphdx.engine.losses import RoiLoss
from lymphdx.engine.run_data import load_run_data
from lymphdx.models.multitask import build_model
from lymphdx.stats.metrics import auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path, help="a `lymphdx synth` folder")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], help="d h w")
    parser.add_argument("--foreground", type=float, default=0.33)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bias", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data_cfg = load_config().model_dump(mode="json")
    data_cfg["manifests"] = {
        "weak": str((args.data / "weak" / "manifest.csv").resolve()),
        "strong": str((args.data / "strong" / "manifest.csv").resolve()),
    }
    config = validate(data_cfg)
    with tempfile.TemporaryDirectory() as run:
        data = load_run_data(config, Path(run))
        train = data.volumes("strong", "train", masks=True)
        val = data.volumes("strong", "val", masks=True)
        weak = data.volumes("weak", "val")
        model = build_model(config.model)
        if args.bias is not None:
            torch.nn.init.constant_(model.decoder.head[-1].bias, args.bias)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        loss_fn, rng = RoiLoss(), np.random.default_rng(0)
        foreground = [np.argwhere(train.mask(i) > 0) for i in range(len(train))]
        start = time.perf_counter()
        print("step | ROI loss | strong-val Dice@0.5 | weak-val AUC of max p | seconds")
        for step in range(1, args.steps + 1):
            images, masks = [], []
            for i in rng.integers(len(train), size=args.batch):
                corner = patch_corner(
                    train.mask(i), args.patch, args.foreground, rng, foreground[i]
                )
                x, m = (
                    crop(train.image(i), corner, args.patch),
                    crop(train.mask(i), corner, args.patch),
                )
                if rng.random() < 0.5:
                    x, m = x[..., ::-1], m[..., ::-1]
                images.append(x.copy())
                masks.append(m.copy())
            x = torch.from_numpy(np.stack(images)[:, None])
            loss = loss_fn(model(x)["roi"], torch.from_numpy(np.stack(masks)[:, None]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    inter = total = 0.0
                    for i in range(len(val)):
                        p = torch.sigmoid(model(torch.from_numpy(val.image(i))[None, None])["roi"])
                        pred, truth = p[0, 0].numpy() > 0.5, val.mask(i) > 0
                        inter += float((pred & truth).sum())
                        total += float(pred.sum() + truth.sum())
                    top = [
                        float(
                            torch.sigmoid(
                                model(torch.from_numpy(weak.image(i))[None, None])["roi"]
                            ).max()
                        )
                        for i in range(len(weak))
                    ]
                model.train()
                dice = 2 * inter / max(total, 1.0)
                print(
                    f"{step} | {float(loss.detach()):.3f} | {dice:.3f} | "
                    f"{auc(weak.labels, np.array(top)):.3f} | {time.perf_counter() - start:.0f}"
                )


if __name__ == "__main__":
    main()
