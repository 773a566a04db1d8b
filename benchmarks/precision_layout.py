"""Speed of one training step under fp32, bf16 autocast, channels-last-3d and torch.compile.

    python benchmarks/precision_layout.py               # quick preset step, ~8 min with compile
    python benchmarks/precision_layout.py --no-compile  # skip torch.compile (minutes to compile)

The step is the quick preset's ssmdmt step: 4 weak + 2 strong volumes (48×48×32) through
the encoder and classifier, ROI decoder on all 6 (pseudo masks on the weak ones), loss,
backward, Adam. Variants are timed interleaved (round-robin, median of ``--repeats``
rounds) in one process so that load changes hit all of them alike; each time is also
given as a ratio to fp32. With ``--device cuda`` the variants are fp32, bf16, fp16 (AMP
with a gradient scaler), channels-last and compile. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date

import torch

from lymphdx.core.config import load_config
from lymphdx.engine.losses import RoiLoss
from lymphdx.engine.performance import (
    autocast,
    grad_scaler,
    optimizer_step,
    prepare_input,
    prepare_model,
)
from lymphdx.models.multitask import build_model


def make_step(variant: str, device: str, batch: int) -> tuple:
    overrides = {
        "fp32": {},
        "bf16": {"precision": "bf16"},
        "fp16": {"precision": "fp16"},
        "channels-last": {"channels_last": True},
        "compile": {"compile": True},
    }[variant]
    cfg = load_config(preset="quick", overrides={"training": overrides})
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    call = prepare_model(model, cfg.training)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = grad_scaler(cfg.training, device)
    x, y, z = cfg.data.shape
    images = prepare_input(torch.randn(batch, 1, z, y, x, device=device), cfg.training)
    labels = torch.randint(0, 2, (batch,), device=device).float()
    masks = (torch.rand(batch, 1, z, y, x, device=device) > 0.995).to(torch.uint8)
    loss_fn = RoiLoss()

    def step() -> float:
        with autocast(cfg.training, device):
            out = call(images, roi=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out["cls"].float(), labels
            ) + loss_fn(out["roi"].float(), masks)
        opt.zero_grad(set_to_none=True)
        optimizer_step(loss, opt, scaler)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    variants = ["fp32", "bf16", "channels-last"]
    if args.device == "cuda":
        variants.insert(2, "fp16")
    if not args.no_compile:
        variants.append("compile")
    steps, first = {}, {}
    for v in variants:
        print(f"building {v} …", file=sys.stderr)
        steps[v] = make_step(v, args.device, args.batch)
        start = time.perf_counter()
        steps[v]()  # warm-up (compilation for torch.compile)
        steps[v]()
        first[v] = time.perf_counter() - start
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            start = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - start)
        print(
            f"round {r}: " + ", ".join(f"{v} {times[v][-1]:.3f}s" for v in variants),
            file=sys.stderr,
        )
    med = {v: statistics.median(t) for v, t in times.items()}
    print(
        json.dumps(
            {
                "benchmark": "precision_layout",
                "date": date.today().isoformat(),
                "machine": platform.machine(),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "step_seconds_median": {v: round(t, 4) for v, t in med.items()},
                "ratio_to_fp32": {v: round(t / med["fp32"], 3) for v, t in med.items()},
                "first_two_steps_seconds": {v: round(t, 1) for v, t in first.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
