"""The same cross-validated compare through ``--executor local`` and ``--executor ray`` on
this machine: wall time side by side, and what Ray adds per run (issue 31.1).

    OMP_NUM_THREADS=1 python benchmarks/executor_overhead.py --out /tmp/exec_bench
    OMP_NUM_THREADS=1 python benchmarks/executor_overhead.py --out /tmp/exec_bench \\
        --cv 5 --epochs 14 --strategies supervised semi-supervised multitask ssmdmt

Both compares train the same runs (the quick preset, ``training.num_threads: 1``, the
given strategies × ``--cv`` folds, seed 0) on the same synthetic data (``lymphdx synth``
defaults unless ``--data``) with the preprocessing cache filled first and outside the
timings: ``local`` as ``--jobs W`` spawned processes, ``ray`` as Ray tasks of 1 CPU on a
local Ray of W CPUs (its start and stop inside the timing, as a user sees it). Each runs
into a fresh folder under ``--out``. Per executor: the wall time, the seconds spent inside
the runs (``execute``, summed), and the overhead per run, (wall × W − run seconds) / runs:
process start, imports, scheduling and idle workers at the end, which both executors
have; the difference of the two rows is what Ray adds. Ray's start and stop alone are
timed too. The tables of both must be equal to the digit (checked, and said). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from lymphdx.core.config import load_config
from lymphdx.data.synthetic import SynthSpec, write_synthetic
from lymphdx.workflows.compare import compare
from lymphdx.workflows.compare_runs import warm_cache
from lymphdx.workflows.executors import LocalExecutor, Outcome, RayExecutor, RunTask


class Timed:
    """An executor that records the outcomes of the one it wraps."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.name = inner.name
        self.parallel = inner.parallel
        self.warms_cache = inner.warms_cache
        self.outcomes: list[Outcome] = []

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]:
        self.outcomes = self.inner.run(tasks, progress)
        return self.outcomes


def ray_start_stop(cpus: int) -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: None).remote())
    ray.shutdown()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, help="synthetic data folder (default: OUT/data)")
    p.add_argument("--cv", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="runs at once (--jobs, Ray CPUs)")
    p.add_argument("--strategies", nargs="+", default=["supervised", "multitask"])
    args = p.parse_args()
    data = args.data or args.out / "data"
    if not (data / "weak" / "manifest.csv").exists():
        write_synthetic(data, SynthSpec(), jobs=args.workers)
    weak, strong = data / "weak" / "manifest.csv", data / "strong" / "manifest.csv"
    over = {
        "data": {"cache_dir": str(args.out / "cache")},
        "training": {"epochs": args.epochs, "num_threads": 1},
        "compare": {"ray": {"cpus": args.workers}, "cpus_per_run": 1},
    }
    config = load_config(preset="quick", overrides=over)
    warm_cache(config, weak, strong)
    rows = {}
    for name, inner in (
        ("local", LocalExecutor(args.workers, 1)),
        ("ray", RayExecutor(config.compare)),
    ):
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        executor = Timed(inner)
        start = time.perf_counter()
        compare(
            config, weak, strong, out, args.strategies, [0], False, cv=args.cv, executor=executor
        )
        wall = time.perf_counter() - start
        inside = sum(o.seconds or 0.0 for o in executor.outcomes)
        n = len(executor.outcomes)
        rows[name] = (wall, n, inside, (wall * args.workers - inside) / n)
    same = all(
        (args.out / "local" / f).read_text() == (args.out / "ray" / f).read_text()
        for f in ("results.md", "test_predictions.csv")
    )
    startup = ray_start_stop(args.workers)
    print(
        f"{len(args.strategies)} strategies × {args.cv} folds, {args.epochs} epochs, "
        f"{args.workers} runs at once, 1 thread each; tables equal to the digit: "
        f"{'yes' if same else 'NO'}\n"
    )
    print("| executor | wall s | runs | s inside runs (sum) | overhead s per run |")
    print("|---|---|---|---|---|")
    for name, (wall, n, inside, per_run) in rows.items():
        print(f"| {name} | {wall:.1f} | {n} | {inside:.1f} | {per_run:.1f} |")
    added = rows["ray"][0] - rows["local"][0]
    print(
        f"\nRay adds {added:+.1f} s wall ({added / rows['ray'][1]:+.2f} s per run), of which "
        f"starting and stopping a local Ray of {args.workers} CPUs is {startup:.1f} s."
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
