"""How time and memory of the quick model grow with the input size.

Command (from the repository root; ~2-3 min on the 2-core VM, ``--quick`` ~30 s):

    .venv/bin/python benchmarks/scaling.py [--sizes 64 96 128 192] [--repeats 3] [--quick]

What it measures: one training step (forward + backward of classifier and ROI decoder,
``roi=True``, the trainer's losses, Adam step) of the quick preset's model
(``build_model(load_config(preset="quick").model)``) on batch 1 of cubic inputs N³ for N
in ``--sizes`` (each a multiple of the model's downsampling factor 16), each size in a
fresh subprocess so that its peak RSS is its own. Per size: median (and minimum) step time
of ``--repeats`` steps after one warm-up step (the warm-up is counted with
``FlopCounterMode`` to give the step's FLOPs), peak RSS (VmHWM) minus the RSS
before the first step at that size (``baseline``: imports, model and optimizer built, one
step at 32³ done so lazily initialised library state is in it), and the CUDA peak when run
with ``--device cuda``. Then least-squares fits (``numpy.polyfit``, degree 1) of
log(time) and log(peak − baseline) against log(voxels): exponents near 1 mean linear
scaling, so a larger grid costs time and memory in proportion to its voxels; and affine
fits (fixed part + per-voxel part: µs and bytes per voxel), since a fixed part pulls the
log-log exponent below 1 over small sizes.

``--quick`` runs sizes 32 48 64 with 2 repeats. Prints one JSON object to stdout;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit, log, machine, median, mib, peak_rss_kib, rss_kib, run_child  # noqa: E402


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lymphdx.core.config import load_config
    from lymphdx.engine.losses import RoiLoss, classification_loss
    from lymphdx.models.multitask import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(load_config(preset="quick").model).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    roi_loss = RoiLoss()
    label = torch.ones(1, device=device)

    def step(x: torch.Tensor, mask: torch.Tensor) -> None:
        out = model(x, roi=True)
        loss = classification_loss(out["cls"], label) + roi_loss(out["roi"], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # one step at 32³ first, so that the baseline holds the libraries' lazily set-up state
    # (oneDNN kernels, allocator arenas) and the difference is the size's own memory
    tiny = torch.zeros(1, 1, 32, 32, 32, device=device)
    step(tiny, tiny > 0)
    baseline = rss_kib()
    n = args.size
    x = torch.randn(1, 1, n, n, n, device=device)
    mask = torch.rand(1, 1, n, n, n, device=device) < 0.002
    counter = FlopCounterMode(display=False)
    with counter:
        step(x, mask)  # warm-up, counted
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(x, mask)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_kib()
    flops = counter.get_total_flops()
    return {
        "size": n,
        "voxels": n**3,
        "median_step_s": round(median(times), 4),
        "min_step_s": round(min(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "gflop": round(flops / 1e9, 2),
        "gflops": round(flops / median(times) / 1e9, 1),
        "peak_rss_mib": mib(peak),
        "baseline_rss_mib": mib(baseline),
        "peak_minus_baseline_mib": mib(peak - baseline),
        "bytes_per_voxel": round((peak - baseline) * 1024 / n**3, 1),
        "cuda_peak_mib": (
            round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
        ),
        "threads": torch.get_num_threads(),
    }


def fit(x: list[float], y: list[float]) -> dict[str, float] | None:
    """Exponent and prefactor of y ≈ c · x^k from a log-log least-squares line."""
    import numpy as np

    if len(x) < 2 or min(y) <= 0:
        return None
    (k, logc), res, *_ = np.polyfit(np.log(x), np.log(y), 1, full=True)
    ly = np.log(y)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1 - float(res[0]) / ss_tot if len(res) and ss_tot > 0 else 1.0
    return {"exponent": round(float(k), 3), "prefactor": float(np.exp(logc)), "r2": round(r2, 4)}


def affine(x: list[float], y: list[float], scale: float) -> dict[str, float] | None:
    """y ≈ a + b·x (``numpy.polyfit``): a fixed part ``a`` and a per-voxel part ``b·scale``.

    A fixed part (library workspaces, allocator arenas, per-call overheads) makes the
    log-log exponent of small sizes fall below 1 even when the per-voxel part is linear.
    """
    import numpy as np

    if len(x) < 2:
        return None
    b, a = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return {"intercept": round(float(a), 3), "per_voxel": round(float(b) * scale, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 32 48 64, 2 repeats")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        emit(child(args))
        return
    if args.quick:
        args.sizes, args.repeats = [32, 48, 64], 2
    bad = [s for s in args.sizes if s % 16]
    if bad:
        raise SystemExit(f"sizes must be multiples of 16 (the model's downsampling): {bad}")
    t_start = time.perf_counter()
    rows = []
    for size in args.sizes:
        log(f"{size}^3: {args.repeats} steps after a warm-up, in a subprocess")
        rows.append(
            run_child(
                Path(__file__),
                [
                    "--size",
                    str(size),
                    "--repeats",
                    str(args.repeats),
                    "--device",
                    args.device,
                    "--threads",
                    str(args.threads),
                ],
            )  # fmt: skip
        )
        r = rows[-1]
        log(f"{size}^3: {r['median_step_s']} s, +{r['peak_minus_baseline_mib']} MiB")
    voxels = [r["voxels"] for r in rows]
    out: dict[str, Any] = {
        "benchmark": "scaling",
        "device": args.device,
        "model": "quick preset, classifier + decoder, batch 1, forward + backward + Adam",
        "sizes": rows,
        "fit_time_vs_voxels": fit(voxels, [r["median_step_s"] for r in rows]),
        "fit_memory_vs_voxels": fit(voxels, [r["peak_minus_baseline_mib"] for r in rows]),
        "fit_flops_vs_voxels": fit(voxels, [r["gflop"] for r in rows]),
        # intercept in s / MiB; per_voxel in µs / bytes per voxel
        "affine_time_s": affine(voxels, [r["median_step_s"] for r in rows], 1e6),
        "affine_memory_mib": affine(voxels, [r["peak_minus_baseline_mib"] for r in rows], 2**20),
    }
    if args.device == "cuda":
        out["fit_cuda_memory_vs_voxels"] = fit(voxels, [r["cuda_peak_mib"] for r in rows])
    out["repeats"] = args.repeats
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out["machine"] = machine(args.threads)
    emit(out)


if __name__ == "__main__":
    main()
