"""Full-resolution (paper preset, 512×512×256) inference and training step: time and memory.

    python benchmarks/full_resolution.py                       # all cases below, ~15 min
    python benchmarks/full_resolution.py --cases infer --shape 128 128 64   # smoke run

Each case runs in a fresh subprocess so its peak resident memory (``ru_maxrss``) is its
own; the subprocess is limited to ``--limit-gib`` of address space, so a case that does
not fit fails with an allocation error instead of waking the OOM killer. For every case
the traced estimate of ``lymphdx.engine.memory`` is printed next to the measurement.

Cases: ``infer`` (eval, no_grad, classifier + ROI decoder, 1 volume, as ``lymphdx
predict``), ``infer-cl`` (the same in channels-last-3d), ``train-<mode>`` (one step of
forward, BCE + Dice/CE loss, backward and Adam on 1 volume with ROI target, checkpointing
``<mode>`` in off/bottleneck/block). On CUDA (``--device cuda``) the CUDA peak is
reported too, and ``--amp`` runs the step under fp16/bf16 autocast.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date

CASES = ["infer", "infer-cl", "train-block", "train-bottleneck", "train-off"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, shape_zyx: list[int], device: str, amp: str, repeats: int) -> dict:
    """One case in this process (called in the subprocess)."""
    import torch

    from lymphdx.core.config import load_config
    from lymphdx.engine.losses import RoiLoss
    from lymphdx.engine.memory import estimate_step_memory
    from lymphdx.engine.performance import optimizer_step
    from lymphdx.models.multitask import build_model

    cfg = load_config(preset="paper")
    mode = case.split("-", 1)[1] if case.startswith("train") else "off"
    mcfg = cfg.model.model_copy(update={"checkpointing": mode})
    train = case.startswith("train")
    est = estimate_step_memory(mcfg, tuple(shape_zyx), 1, True, train=train)
    torch.manual_seed(0)
    model = build_model(mcfg).to(device)
    x = torch.randn(1, 1, *shape_zyx, device=device)
    if case == "infer-cl":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    target = (torch.rand(1, 1, *shape_zyx, device=device) > 0.999).to(torch.uint8)
    base = _rss_mib()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = RoiLoss()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device) if amp == "fp16" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            if train:
                model.train()
                out = model(x, roi=True)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    out["cls"].float(), torch.ones(1, device=device)
                ) + loss_fn(out["roi"].float(), target)
            else:
                model.eval()
                with torch.no_grad():
                    out = model(x, roi=True)
                    torch.sigmoid(out["roi"])
        if train:
            opt.zero_grad(set_to_none=True)
            del out
            optimizer_step(loss, opt, scaler)
            del loss
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    res = {
        "case": case,
        "shape_zyx": shape_zyx,
        "seconds": [round(t, 2) for t in times],
        "peak_rss_gib": round(_rss_mib() / 1024, 2),
        "rss_before_step_gib": round(base / 1024, 2),
        "traced_gib": round(est.traced_bytes / 2**30, 2),
        "estimated_rss_gib": round(est.rss_bytes / 2**30, 2),
        "threads": torch.get_num_threads(),
        "amp": amp,
    }
    if device == "cuda":
        res["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["cuda_device"] = torch.cuda.get_device_name()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--shape", nargs=3, type=int, default=[512, 512, 256], help="x y z")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit-gib", type=float, default=22.0)
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape_zyx = args.shape[::-1]
    if args._case:
        limit = int(args.limit_gib * 2**30)
        if args.device == "cpu":
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            print(json.dumps(run_case(args._case, shape_zyx, args.device, args.amp, args.repeats)))
        except (RuntimeError, MemoryError) as err:
            msg = str(err).splitlines()[0][:300]
            print(
                json.dumps({"case": args._case, "failed": msg, "peak_rss_gib": _rss_mib() / 1024})
            )
        return
    results = []
    for case in args.cases:
        print(f"running {case} …", file=sys.stderr)
        cmd = [sys.executable, __file__, "--_case", case, "--shape", *map(str, args.shape)]
        cmd += ["--device", args.device, "--amp", args.amp, "--repeats", str(args.repeats)]
        cmd += ["--limit-gib", str(args.limit_gib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        results.append(json.loads(line) if line else {"case": case, "failed": proc.stderr[-500:]})
        print(json.dumps(results[-1]), file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "full_resolution",
                "date": date.today().isoformat(),
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{__import__('os').cpu_count()} cores",
                "shape_xyz": args.shape,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
