"""FLOPs and achieved FLOP rate of one training step of the quick model, against matmul.

Command (from the repository root; ~1 min on the 2-core VM, ``--quick`` ~20 s):

    .venv/bin/python benchmarks/flop_efficiency.py [--repeats 10] [--warmup 3] [--quick]

What it measures, in one process (``--device cuda`` runs the same on a GPU):
- FLOPs of one training step (forward + backward; ``torch.utils.flop_counter
  .FlopCounterMode``, which counts convolutions and matrix products only) of the quick
  preset's model (``build_model(load_config(preset="quick").model)``) at the quick
  preset's step shape: ``batch_size`` 4 weak scans + ``strong_batch_size`` 2 strong
  scans of ``data.shape`` 48×48×32 (tensor ``(6, 1, 32, 48, 48)``). The step kinds are the
  trainer's (``Trainer.train_step``): ``ssmdmt`` after the first propagation decodes all
  6 scans (``roi=True``: real masks on the strong ones, pseudo masks on the weak ones);
  ``multitask`` (and ``ssmdmt`` before propagation) decodes the 2 strong ones
  (``roi=slice(4, None)``); ``semi_supervised`` classifies 6 (``roi=False``);
  ``supervised`` is the classifier-only step on the 4 weak scans. Losses as the trainer's
  (BCE, Dice + CE), Adam step included in the timing (not in the FLOPs; it is
  element-wise on 0.07 M parameters).
- each step's time (median of ``--repeats`` after ``--warmup``; the minimum too, which is
  the steadier figure on a shared machine), achieved GFLOP/s, and
  the ratio to this machine's fp32 matmul rate measured in the same run (2048² ``torch.mm``,
  median; target: ratio ≥ 0.40);
- where the FLOPs are (forward FLOPs by part and kind: stem, 3×3×3 convs, 1×1×1 convs,
  linear) and where the time goes (``torch.profiler`` self CPU time of the ssmdmt step by
  op family: convolution, batch norm, ReLU, concatenation, upsampling, pooling, optimizer,
  copies, other), so that conv GFLOP/s = conv FLOPs / conv time can be read off;
- conv3d-only GFLOP/s (forward, and forward + backward) of the most expensive layer of
  the model (first dense block's 3×3×3 conv, 16→8 channels at (6, 16, 16, 24, 24)) and of
  a reference layer (32→32, k3, batch 2 at 64³; skipped with ``--quick``).

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit, log, machine, median  # noqa: E402

from lymphdx.core.config import load_config  # noqa: E402
from lymphdx.engine.losses import RoiLoss, classification_loss  # noqa: E402
from lymphdx.models.multitask import build_model  # noqa: E402

TARGET_RATIO = 0.40
# step kind -> (scans in the batch, which scans the decoder sees: none, the strong ones, all)
STEPS: dict[str, tuple[str, str]] = {
    "supervised": ("weak", "none"),
    "semi_supervised": ("weak+strong", "none"),
    "multitask": ("weak+strong", "strong"),
    "ssmdmt": ("weak+strong", "all"),
}


def roi_argument(decode: str, n_weak: int) -> bool | slice:
    """``MultiTaskNet.forward``'s ``roi`` for a step kind, as ``Trainer.train_step`` sets it."""
    return {"none": False, "strong": slice(n_weak, None), "all": True}[decode]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_rate(device: torch.device, n: int, warmup: int, repeats: int) -> dict[str, Any]:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = timed(lambda: torch.mm(a, b), device, warmup, repeats)
    return {
        "n": n,
        "median_s": round(median(times), 5),
        "gflops": 2 * n**3 / median(times) / 1e9,
        "gflops_best": round(2 * n**3 / min(times) / 1e9, 1),
    }


def make_step(model: nn.Module, kind: str, n_weak: int, n_strong: int, shape, device):
    """A closure running one training step of ``kind`` (trainer's losses, Adam)."""
    scans, decode = STEPS[kind]
    roi = roi_argument(decode, n_weak)
    n = n_weak + (n_strong if scans == "weak+strong" else 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, *shape, generator=gen).to(device)
    labels = (torch.rand(n, generator=gen) < 0.5).float().to(device)
    masks = (torch.rand(n, 1, *shape, generator=gen) < 0.002).to(device)
    roi_loss = RoiLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        out = model(x, roi=roi)
        loss = classification_loss(out["cls"][:n_weak], labels[:n_weak])
        if n > n_weak:  # pseudo class labels on the strong scans
            loss = loss + classification_loss(out["cls"][n_weak:], labels[n_weak:])
        if roi is True:
            loss = loss + roi_loss(out["roi"][n_weak:], masks[n_weak:])
            loss = loss + roi_loss(out["roi"][:n_weak], masks[:n_weak])
        elif isinstance(roi, slice):
            loss = loss + roi_loss(out["roi"], masks[roi])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, n


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, dict[Any, int]]]:
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()


def forward_breakdown(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Forward FLOPs of the ssmdmt step by part (encoder/decoder/classifier) and layer kind."""
    with torch.no_grad():
        total, counts = count_flops(lambda: model(x, roi=True))
    root = type(model).__name__
    by_kind: dict[str, int] = defaultdict(int)
    by_part: dict[str, int] = defaultdict(int)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv3d, nn.Linear)):
            continue
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif name.startswith("encoder.stem"):
            kind = "stem_conv"
        else:
            kind = f"conv_k{m.kernel_size[0]}"
        by_kind[kind] += flops
        by_part[name.split(".")[0]] += flops
    return {
        "forward_gflop": round(total / 1e9, 4),
        "share_by_kind": {k: round(v / total, 4) for k, v in sorted(by_kind.items())},
        "share_by_part": {k: round(v / total, 4) for k, v in sorted(by_part.items())},
    }


FAMILIES = (
    ("convolution", ("conv",)),
    ("batch_norm", ("batch_norm",)),
    ("relu", ("relu", "threshold")),
    ("concatenation", ("cat",)),
    ("upsampling", ("upsample",)),
    ("pooling", ("pool", "mean", "amax", "max")),
    ("optimizer", ("adam", "_foreach", "addcdiv", "sqrt", "lerp")),
    ("copies_and_allocation", ("copy", "clone", "contiguous", "empty", "zero", "fill", "to")),
)


def time_profile(step: Callable[[], None], conv_flops: int, repeats: int) -> dict[str, Any]:
    """Self CPU time of ``repeats`` steps by op family, and conv GFLOP/s from it."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    fam: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        name = e.key.lower()
        family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        fam[family] += e.self_cpu_time_total / 1e6 / repeats
    total = sum(fam.values())
    conv_s = fam.get("convolution", 0.0)
    return {
        "profiled_step_s": round(total, 4),
        "self_time_share": {
            k: round(v / total, 4) for k, v in sorted(fam.items(), key=lambda i: -i[1])
        },
        "conv_gflops_in_step": round(conv_flops / conv_s / 1e9, 1) if conv_s else None,
        "non_conv_seconds": round(total - conv_s, 4),
    }


def conv_rate(
    cin: int, cout: int, batch_shape: tuple[int, ...], device, warmup: int, repeats: int
) -> dict[str, Any]:
    conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False).to(device)
    x = torch.randn(*batch_shape, device=device, requires_grad=True)
    with torch.no_grad():
        fwd_flops, _ = count_flops(lambda: conv(x))

    def fwd_bwd() -> None:
        conv(x).sum().backward()

    fb_flops, _ = count_flops(fwd_bwd)
    with torch.no_grad():
        t_f = median(timed(lambda: conv(x), device, warmup, repeats))
    t_fb = median(timed(fwd_bwd, device, warmup, repeats))
    return {
        "layer": f"Conv3d {cin}->{cout} k3, input {list(batch_shape)}",
        "forward_gflop": round(fwd_flops / 1e9, 3),
        "forward_gflops": round(fwd_flops / t_f / 1e9, 1),
        "forward_backward_gflops": round(fb_flops / t_fb / 1e9, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 1 warm-up")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()

    cfg = load_config(preset="quick")
    shape = tuple(reversed(cfg.data.shape))  # ITK (x, y, z) -> tensor (D, H, W)
    n_weak, n_strong = cfg.training.batch_size, cfg.training.strong_batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    params = sum(p.numel() for p in model.parameters())

    log("fp32 matmul 2048^2")
    mm = matmul_rate(device, 2048, args.warmup, max(args.repeats, 3))
    steps: dict[str, Any] = {}
    ssmdmt_step = None
    for kind in STEPS:
        step, n = make_step(model, kind, n_weak, n_strong, shape, device)
        flops, counts = count_flops(step)
        conv = sum(v for op, v in counts["Global"].items() if "convolution" in str(op))
        log(f"{kind}: {flops / 1e9:.2f} GFLOP; timing {args.repeats} steps")
        times = timed(step, device, args.warmup, args.repeats)
        t = median(times)
        rate = flops / t / 1e9
        steps[kind] = {
            "scans": n,
            "decoded_scans": {"none": 0, "strong": n - n_weak, "all": n}[STEPS[kind][1]],
            "gflop": round(flops / 1e9, 3),
            "gflop_per_scan": round(flops / n / 1e9, 3),
            "conv_share_of_flops": round(conv / flops, 5),
            "median_step_s": round(t, 4),
            "volumes_per_s": round(n / t, 2),
            "gflops": round(rate, 1),
            "ratio_to_matmul": round(rate / mm["gflops"], 3),
            "min_step_s": round(min(times), 4),
            "gflops_at_min": round(flops / min(times) / 1e9, 1),
        }
        if kind == "ssmdmt":
            ssmdmt_step, ssmdmt_conv = step, conv

    log("forward FLOPs by part and kind")
    x = torch.randn(n_weak + n_strong, 1, *shape, device=device)
    breakdown = forward_breakdown(model, x)
    profile = None
    if device.type == "cpu" and ssmdmt_step is not None:
        log("profiling the ssmdmt step")
        profile = time_profile(ssmdmt_step, ssmdmt_conv, max(2, args.repeats // 2))

    log("conv3d-only rates")
    convs = [conv_rate(16, 8, (n_weak + n_strong, 16, *(s // 2 for s in shape)), device, 1, 3)]
    if not args.quick:
        convs.append(conv_rate(32, 32, (2, 32, 64, 64, 64), device, 1, 3))

    head = steps["ssmdmt"]
    mm["gflops"] = round(mm["gflops"], 1)
    emit(
        {
            "benchmark": "flop_efficiency",
            "device": str(device),
            "model": "quick preset",
            "params": params,
            "input_shape_dhw": list(shape),
            "step_batch": {"weak": n_weak, "strong": n_strong},
            "matmul_fp32": mm,
            "headline": {
                "step": "ssmdmt after propagation (6 scans, all decoded)",
                "gflop": head["gflop"],
                "median_step_s": head["median_step_s"],
                "gflops": head["gflops"],
                "ratio_to_matmul": head["ratio_to_matmul"],
                "target_ratio": TARGET_RATIO,
                "meets_target": head["ratio_to_matmul"] >= TARGET_RATIO,
            },
            "steps": steps,
            "forward_flops_breakdown_ssmdmt": breakdown,
            "time_profile_ssmdmt": profile,
            "conv3d_only": convs,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
