"""``lymphdx compare``: its options and checks; ``cli`` registers it. Where the runs
train (``--executor``, ``--plan``, ``--collect``) is ``workflows.executors``'."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from lymphdx.cli_common import (
    ConfigOpt,
    EpochsOpt,
    PresetOpt,
    _check_at_least,
    _check_cache,
    _check_out_folder,
    _config,
)
from lymphdx.core.errors import LymphdxError

Executor = Literal["local", "ray", "slurm"]  # lymphdx.core.config_compare.EXECUTORS


def where_overrides(
    executor: str | None,
    ray_address: str | None,
    cpus_per_run: int | None,
    gpus_per_run: float | None,
    partition: str | None,
    time_limit: str | None,
) -> dict[str, Any] | None:
    """The ``compare`` config section's keys that the command line sets (none: ``None``)."""
    from lymphdx.core.config_compare import slurm_minutes

    _check_at_least(cpus_per_run, "--cpus-per-run")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise LymphdxError(f"--gpus-per-run must be at least 0, got {gpus_per_run:g}")
    if time_limit is not None:
        try:
            slurm_minutes(time_limit)
        except ValueError as err:
            raise LymphdxError(f"--time: {err}") from None
    ray = {"address": ray_address} if ray_address else {}
    slurm = {k: v for k, v in (("partition", partition), ("time", time_limit)) if v}
    top = {"executor": executor, "cpus_per_run": cpus_per_run, "gpus_per_run": gpus_per_run}
    found: dict[str, Any] = {k: v for k, v in top.items() if v is not None}
    found |= {k: v for k, v in (("ray", ray), ("slurm", slurm)) if v}
    return found or None


def check_where(
    executor: str,
    given: dict[str, Any] | None,
    jobs: int,
    plan: str | None,
    collect: bool,
    ablation: bool,
) -> None:
    """Refuse options that contradict each other, before anything is written:
    ``executor``: the config's after the command line's; ``given``: the executor options
    on the command line (``where_overrides``)."""
    if plan is not None and collect:
        raise LymphdxError("give --plan or --collect, not both")
    if ablation and (plan is not None or collect or given or executor != "local"):
        raise LymphdxError(
            "--ablation trains its arms on this machine: --executor, its options, --plan "
            "and --collect are for compare's strategies"
        )
    if (plan is not None or collect) and given:
        raise LymphdxError(
            "--plan and --collect train nothing: drop --executor and its options "
            "(--ray-address, --cpus-per-run, --gpus-per-run, --partition, --time)"
        )
    if jobs > 1 and executor != "local" and plan is None and not collect:
        raise LymphdxError(
            f"--jobs is the local executor's; with --executor {executor} the cluster runs "
            "as many runs at once as its CPUs and GPUs allow (--cpus-per-run, --gpus-per-run)"
        )


def stand_in(plan: str | None, collect: bool) -> Any:
    """The executor of ``--plan`` or ``--collect`` (``None``: the config's)."""
    from lymphdx.workflows.executors import CollectExecutor, PlanExecutor

    if plan is not None:
        return PlanExecutor(plan)
    return CollectExecutor() if collect else None


def planned(compare: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
    """``compare(*args, **kwargs)``; after ``--plan``, ``None`` and what was written said
    on stderr (stdout holds only the commands when they go there)."""
    from lymphdx.workflows.executors import PlanWritten

    try:
        return compare(*args, **kwargs)
    except PlanWritten as done:
        where = "stdout" if done.target == "-" else done.target
        typer.echo(
            f"[compare] {done.count} run(s) to train: one command each in {where}; run them "
            "(each again after an interruption: it resumes), then the same compare with "
            "--collect builds the table",
            err=True,
        )
        return None


def compare_cmd(
    weak: Annotated[Path, typer.Option("--weak", help="Weak (label) manifest CSV.")],
    strong: Annotated[Path, typer.Option("--strong", help="Strong (ROI) manifest CSV.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    strategies: Annotated[
        list[str] | None,
        typer.Option(
            "--strategies",
            help="Strategies to run (repeat; default the paper's four, ssmdmt-plus on request).",
        ),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option("--seeds", help="Seeds 0..S-1 (default 3; 1 with --cv).")
    ] = None,
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    epochs: EpochsOpt = None,
    cv: Annotated[
        int,
        typer.Option(
            "--cv", help="K-fold cross-validation over all weak-set patients (0: fixed split)."
        ),
    ] = 0,
    repeats: Annotated[
        int | None,
        typer.Option("--repeats", help="Repeats of the K-fold split (1; 2 with --ablation)."),
    ] = None,
    ablation: Annotated[
        bool,
        typer.Option(
            "--ablation",
            help="The options beyond the paper (EMA teacher, graph propagation, curriculum, "
            "soft pseudo masks, domain batch norm, selection rules) one at a time on top of "
            "ssmdmt, by repeated CV on the "
            "fixed split's train + val patients (test held out); --cv defaults to 3.",
        ),
    ] = False,
    pooled_selection: Annotated[
        bool,
        typer.Option(
            "--pooled-selection",
            help="With --cv: also score each strategy at the epoch of best validation AUC "
            "pooled over the folds (rows <strategy>@pooled-val).",
        ),
    ] = False,
    arms: Annotated[
        list[str] | None,
        typer.Option("--arms", help="With --ablation: the arms to run (repeat; default all)."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Runs trained at once, each in its own process with its share of the cores.",
        ),
    ] = 1,
    executor: Annotated[
        Executor | None,
        typer.Option(
            "--executor",
            help="Where the runs train: local (this machine, --jobs), ray (Ray tasks) or "
            "slurm (a submitit job array); default: the config's compare.executor, local.",
            show_default=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --executor ray: join this cluster (auto, HOST:6379, ray://HOST:10001); "
            "default: start a local Ray.",
        ),
    ] = None,
    cpus_per_run: Annotated[
        int | None,
        typer.Option("--cpus-per-run", help="CPU cores (torch threads) of each run."),
    ] = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option("--gpus-per-run", help="GPUs of each run (ray may share one: 0.5)."),
    ] = None,
    partition: Annotated[
        str | None, typer.Option("--partition", help="With --executor slurm: the partition.")
    ] = None,
    time_limit: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="With --executor slurm: each run's time limit (minutes, H:MM:SS, D-HH:MM:SS; "
            "default 24:00:00).",
        ),
    ] = None,
    plan: Annotated[
        str | None,
        typer.Option(
            "--plan",
            metavar="<file|->",
            help="Train nothing: write one 'lymphdx train ... && lymphdx evaluate ...' line "
            "per unfinished run, for any scheduler (-: stdout).",
        ),
    ] = None,
    collect: Annotated[
        bool,
        typer.Option(
            "--collect",
            help="Train nothing: build the table from the finished run folders in --out.",
        ),
    ] = False,
    effect: Annotated[
        float | None,
        typer.Option(
            "--effect",
            help="The gain in AUC declared before looking, at which each paired test's power "
            "and exaggeration are given (evaluation.declared_effect; default 0.05).",
        ),
    ] = None,
) -> None:
    """Train and evaluate every strategy and seed; writes results.json, results.md, roc.png
    (with --ablation: ablation.json, ablation.md, recommended.yaml)."""
    from lymphdx.reporting.table import format_table
    from lymphdx.workflows.compare import compare

    _check_at_least(epochs, "--epochs")
    _check_at_least(seeds, "--seeds")
    _check_at_least(repeats, "--repeats")
    if cv < 0 or cv == 1:
        raise LymphdxError(f"--cv must be 0 (the fixed split) or at least 2 folds, got {cv}")
    if effect is not None and not 0.0 < effect < 0.49:  # evaluation.declared_effect's range
        raise LymphdxError(f"--effect must lie strictly between 0 and 0.49, got {effect:g}")
    _check_out_folder(out)
    effects = None if effect is None else {"declared_effect": effect}
    epoch = {"epochs": epochs} if epochs else None
    where = where_overrides(
        executor, ray_address, cpus_per_run, gpus_per_run, partition, time_limit
    )
    cfg = _config(config, preset, {"training": epoch, "evaluation": effects, "compare": where})
    _check_cache(cfg.data.cache_dir)
    check_where(cfg.compare.executor, where, jobs, plan, collect, ablation)
    if ablation:
        from lymphdx.workflows.ablation import ablation as run_ablation
        from lymphdx.workflows.ablation import format_ablation

        found = run_ablation(
            cfg,
            weak,
            strong,
            out,
            arms,
            list(range(seeds if seeds is not None else 1)),
            k=cv or 3,
            repeats=repeats or 2,
        )
        typer.echo(format_ablation(found))
        return
    if arms:
        raise typer.BadParameter("--arms needs --ablation")
    n_seeds = seeds if seeds is not None else (1 if cv else 3)
    results = planned(
        compare,
        cfg,
        weak,
        strong,
        out,
        strategies,
        list(range(n_seeds)),
        cv=cv,
        repeats=repeats or 1,
        pooled_selection=pooled_selection,
        jobs=jobs,
        executor=stand_in(plan, collect),
    )
    if results is not None:
        typer.echo(format_table(results))
