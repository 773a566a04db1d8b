"""Training throughput, memory, data-loading share and propagation cost, per strategy.

Command (from the repository root; ~2-4 min on the 2-core VM):

    .venv/bin/python benchmarks/train_throughput.py              # 123 weak + 85 strong, 3 epochs
    .venv/bin/python benchmarks/train_throughput.py --data DIR   # reuse (or write) data in DIR
    .venv/bin/python benchmarks/train_throughput.py --quick      # smoke: 24 + 16 scans, 2 epochs

What it measures: every strategy (``supervised``, ``semi-supervised``, ``multitask``,
``ssmdmt``) trains the ``quick`` preset for E epochs (default 3) with propagation in them
(warm-up 1, every 1, so rounds at epochs 1..E-1) on the built-in synthetic two-hospital
data, each strategy in a fresh subprocess, through the real ``lymphdx.engine.trainer
.train``; the benchmark only wraps ``Trainer.train_step / train_epoch / propagation /
validate / epoch_end`` and ``VolumeSet.batch`` with timers. The preprocessing cache is
filled once before the strategies run (its fill time is reported as
``cache_fill_seconds``), so every run starts with a warm on-disk cache; volumes enter
memory during the first epoch (``VolumeSet`` keeps them), so the first epoch's loading
share includes reading the cache's ``.npy`` files and later epochs' does not.

Per strategy it reports:
- ``throughput_volumes_per_s``: volumes through forward+backward (weak + strong scans of
  each step) per second of ``train_step`` time (data loading, forward, backward, Adam);
  also without the first epoch;
- ``epoch_wall_s``: each epoch's propagation + training + validation + epoch end
  (history, TensorBoard, checkpoints);
- ``peak_rss_mib`` (VmHWM of the subprocess), ``rss_after_imports_mib`` and their
  difference ``peak_minus_imports_mib``; ``cuda_peak_mib`` when training runs on a GPU
  (``--device``, lymphdx's ``training.device``: auto = CUDA when present);
- ``data_loading_share``: time inside ``VolumeSet.batch`` during ``train_step`` / time of
  ``train_step`` (target < 5 %);
- ``propagation``: seconds per round, per round / one epoch's training (``train_epoch``
  of the epochs after warm-up; target < 20 %), amortised when propagating every 2 epochs
  (the quick preset's ``every``), and over the quick preset's 16-epoch schedule.

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    emit,
    ensure_synthetic,
    log,
    machine,
    median,
    mib,
    peak_rss_kib,
    rss_kib,
    run_child,
)

STRATEGIES = ("supervised", "semi-supervised", "multitask", "ssmdmt")
TARGETS = {"data_loading_share_max": 0.05, "propagation_vs_epoch_training_max": 0.20}


# ----------------------------------------------------------------------------- child


class Probe:
    """Timers around the trainer's named steps and ``VolumeSet.batch``, per epoch."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.epoch = 0
        self.epochs: dict[int, dict[str, Any]] = defaultdict(
            lambda: defaultdict(float, step_times=[])
        )

    def install(self) -> type:
        """A ``Trainer`` subclass whose named steps are timed, for ``train(trainer=...)``
        (``VolumeSet.batch`` is not a hook: it is wrapped in place)."""
        from lymphdx.data.datasets import VolumeSet
        from lymphdx.engine.trainer import Trainer

        probe = self

        def timed(name: str, fn):
            def wrapper(trainer, *args, **kwargs):
                probe.epoch = trainer.epoch  # read before epoch_end increments it
                row = probe.epochs[probe.epoch]
                outer, probe.phase = probe.phase, name
                t0 = time.perf_counter()
                try:
                    return fn(trainer, *args, **kwargs)
                finally:
                    row[f"{name}_s"] += time.perf_counter() - t0
                    probe.phase = outer

            return wrapper

        step = Trainer.train_step

        def train_step(trainer, step_no, weak_index, strong_index):
            probe.epoch = trainer.epoch
            row = probe.epochs[trainer.epoch]
            probe.phase = "step"
            t0 = time.perf_counter()
            try:
                return step(trainer, step_no, weak_index, strong_index)
            finally:
                dt = time.perf_counter() - t0
                probe.phase = "train_epoch"
                row["step_s"] += dt
                row["step_times"].append(dt)
                row["steps"] += 1
                row["volumes"] += len(weak_index) + len(strong_index or [])

        batch = VolumeSet.batch

        def timed_batch(self, index, flip=None):
            t0 = time.perf_counter()
            try:
                return batch(self, index, flip)
            finally:
                probe.epochs[probe.epoch][f"{probe.phase}_batch_s"] += time.perf_counter() - t0

        hooks = ("train_epoch", "propagation", "validate", "epoch_end")
        timed_hooks = {name: timed(name, getattr(Trainer, name)) for name in hooks}
        VolumeSet.batch = timed_batch
        return type("TimedTrainer", (Trainer,), {"train_step": train_step, **timed_hooks})


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.utils.tensorboard  # noqa: F401  (the trainer imports it; count it as an import)

    from lymphdx.core.config import load_config
    from lymphdx.core.strategies import get_strategy
    from lymphdx.engine.distributed import resolve_device
    from lymphdx.engine.propagation import is_propagation_epoch
    from lymphdx.engine.train import train

    rss_imports = rss_kib()
    probe = Probe()
    timed_trainer = probe.install()
    overrides: dict[str, Any] = {
        "strategy": args.strategy,
        "data": {"cache_dir": str(args.cache)},
        "training": {"epochs": args.epochs, "device": args.device},
        "propagation": {"warmup_epochs": 1, "every": 1},
    }
    if args.threads:
        overrides["training"]["num_threads"] = args.threads
    cfg = load_config(preset="quick", overrides=overrides)
    t0 = time.perf_counter()
    train(cfg, args.run, args.weak, args.strong, progress=False, trainer=timed_trainer)
    total = time.perf_counter() - t0
    peak = peak_rss_kib()

    epochs = []
    for e in sorted(probe.epochs):
        r = probe.epochs[e]
        wall = r["propagation_s"] + r["train_epoch_s"] + r["validate_s"] + r["epoch_end_s"]
        epochs.append(
            {
                "epoch": e,
                "propagated": r["propagation_s"] > 0,
                "steps": int(r["steps"]),
                "volumes": int(r["volumes"]),
                "train_step_s": round(r["step_s"], 3),
                "median_step_s": round(median(r["step_times"]), 4),
                "train_epoch_s": round(r["train_epoch_s"], 3),
                "volumes_per_s": _ratio(r["volumes"], r["step_s"]),
                "data_loading_s": round(r["step_batch_s"], 4),
                "data_loading_share": _ratio(r["step_batch_s"], r["step_s"]),
                "propagation_s": round(r["propagation_s"], 3),
                "propagation_loading_s": round(r["propagation_batch_s"], 4),
                "validate_s": round(r["validate_s"], 3),
                "epoch_end_s": round(r["epoch_end_s"], 3),
                "wall_s": round(wall, 3),
            }
        )

    def total_of(key: str, rows: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in rows)

    later = [r for r in epochs if r["epoch"] >= 1]
    step_times = [t for r in probe.epochs.values() for t in r["step_times"]]
    device = resolve_device(cfg.training.device)
    cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    rounds = [r["propagation_s"] for r in epochs if r["propagated"]]
    out: dict[str, Any] = {
        "strategy": args.strategy,
        "epochs": args.epochs,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train_seconds_total": round(total, 2),
        "throughput_volumes_per_s": _ratio(
            total_of("volumes", epochs), total_of("train_step_s", epochs)
        ),
        "throughput_volumes_per_s_after_first_epoch": _ratio(
            total_of("volumes", later), total_of("train_step_s", later)
        ),
        "median_step_s": round(median(step_times), 4),
        "epoch_wall_s": [r["wall_s"] for r in epochs],
        "peak_rss_mib": mib(peak),
        "rss_after_imports_mib": mib(rss_imports),
        "peak_minus_imports_mib": mib(peak - rss_imports),
        "cuda_peak_mib": None if cuda is None else round(cuda, 1),
        "data_loading_share": {
            "all_epochs": _ratio(
                total_of("data_loading_s", epochs), total_of("train_step_s", epochs)
            ),
            "first_epoch": epochs[0]["data_loading_share"],
            "after_first_epoch": _ratio(
                total_of("data_loading_s", later), total_of("train_step_s", later)
            ),
        },
        "per_epoch": epochs,
    }
    if get_strategy(args.strategy).propagates and rounds:
        train_epoch = sum(r["train_epoch_s"] for r in later) / len(later)
        per_round = sum(rounds) / len(rounds)
        quick = load_config(preset="quick")
        n_rounds = sum(
            is_propagation_epoch(e, quick.propagation) for e in range(quick.training.epochs)
        )
        ratio = per_round / train_epoch
        out["propagation"] = {
            "rounds": len(rounds),
            "seconds_per_round": round(per_round, 3),
            "train_epoch_s_mean_after_warmup": round(train_epoch, 3),
            "per_round_vs_epoch_training": round(ratio, 4),
            "amortised_every_2_epochs": round(ratio / quick.propagation.every, 4),
            "amortised_quick_schedule": {
                "rounds": n_rounds,
                "epochs": quick.training.epochs,
                "ratio": round(ratio * n_rounds / quick.training.epochs, 4),
            },
        }
    else:
        out["propagation"] = None
    return out


# ----------------------------------------------------------------------------- parent


def warm_cache(weak_csv: Path, strong_csv: Path, cache: Path) -> float:
    """Preprocess every image and mask into ``cache`` (no-op when already there)."""
    from lymphdx.core.config import load_config
    from lymphdx.data.manifest import load_manifests
    from lymphdx.data.preprocess import PreprocessCache

    cfg = load_config(preset="quick", overrides={"data": {"cache_dir": str(cache)}})
    pc = PreprocessCache(cache, cfg.data)
    weak, strong = load_manifests(weak_csv, strong_csv)
    t0 = time.perf_counter()
    for r in weak:
        pc.image(r.image, r.patient_id)
    for r in strong:
        pc.image(r.image, r.patient_id)
        pc.mask(r.mask, r.image, r.patient_id)
    return round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="synthetic data folder (reused, or written)")
    ap.add_argument("--cache", type=Path, help="preprocessing cache (default: a temp folder)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--n-weak", type=int, default=123)
    ap.add_argument("--n-pos", type=int, default=57)
    ap.add_argument("--n-strong", type=int, default=85)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 24 + 16 scans, 2 epochs")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (data, runs)")
    # child mode (internal)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--weak", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--strong", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        emit(child(args))
        return
    if args.quick:
        args.n_weak, args.n_pos, args.n_strong, args.epochs = 24, 11, 16, 2
    work = Path(tempfile.mkdtemp(prefix="lymphdx-throughput-"))
    t_start = time.perf_counter()
    try:
        weak, strong, gen_s = ensure_synthetic(
            args.data or work / "data", args.n_weak, args.n_pos, args.n_strong
        )
        cache = args.cache or work / "cache"
        log(f"filling the preprocessing cache {cache}")
        fill_s = warm_cache(weak, strong, cache)
        results = {}
        for s in args.strategies:
            log(f"{s}: training {args.epochs} epochs in a subprocess")
            extra = ["--device", args.device]
            extra += ["--threads", str(args.threads)] if args.threads else []
            results[s] = run_child(
                Path(__file__),
                [
                    "--strategy", s, "--weak", str(weak), "--strong", str(strong),
                    "--cache", str(cache), "--epochs", str(args.epochs),
                    "--run", str(work / "runs" / s), *extra,
                ],
            )  # fmt: skip
            r = results[s]
            log(
                f"{s}: {r['throughput_volumes_per_s']} vol/s, loading share "
                f"{r['data_loading_share']['all_epochs']}, peak RSS {r['peak_rss_mib']} MiB"
            )
        summary = {
            s: {
                "volumes_per_s": r["throughput_volumes_per_s"],
                "epoch_wall_s_mean": round(sum(r["epoch_wall_s"]) / len(r["epoch_wall_s"]), 2),
                "peak_rss_mib": r["peak_rss_mib"],
                "data_loading_share": r["data_loading_share"]["all_epochs"],
                "propagation_per_round_vs_epoch": (
                    r["propagation"]["per_round_vs_epoch_training"] if r["propagation"] else None
                ),
            }
            for s, r in results.items()
        }
        shares = [r["data_loading_share"]["all_epochs"] for r in results.values()]
        props = [
            r["propagation"]["per_round_vs_epoch_training"]
            for r in results.values()
            if r["propagation"]
        ]
        data_note = (
            str(args.data)
            if args.data
            else f"generated: {args.n_weak} weak ({args.n_pos} positive), {args.n_strong} strong"
        )
        emit(
            {
                "benchmark": "train_throughput",
                "preset": "quick",
                "epochs": args.epochs,
                "propagation": {"warmup_epochs": 1, "every": 1},
                "data": data_note,
                "generate_seconds": gen_s,
                "cache_fill_seconds": fill_s,
                "targets": TARGETS,
                "meets_targets": {
                    "data_loading_share": all(x is not None and x < 0.05 for x in shares),
                    "propagation_per_round": all(x < 0.20 for x in props) if props else None,
                },
                "summary": summary,
                "strategies": results,
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "machine": machine(args.threads),
            }
        )
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
