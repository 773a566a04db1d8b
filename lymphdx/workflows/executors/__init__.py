"""Where ``compare`` trains its runs: ``local`` (this machine, ``--jobs``), ``ray`` (Ray
tasks) or ``slurm`` (a submitit job array), chosen by ``compare.executor``; and the
stand-ins of ``--plan`` (write the commands) and ``--collect`` (train nothing). Every
executor runs ``base.execute`` per run, so the run folders, and the table built from
them, do not depend on where the runs were trained."""

from __future__ import annotations

from pathlib import Path

from lymphdx.core.config import CompareConfig
from lymphdx.workflows.executors.base import (
    Executor,
    Outcome,
    RunsFailed,
    RunTask,
    execute,
)
from lymphdx.workflows.executors.local import LocalExecutor
from lymphdx.workflows.executors.plan import CollectExecutor, PlanExecutor, PlanWritten
from lymphdx.workflows.executors.ray_tasks import RayExecutor
from lymphdx.workflows.executors.slurm_array import SlurmExecutor

__all__ = [
    "CollectExecutor",
    "Executor",
    "LocalExecutor",
    "Outcome",
    "PlanExecutor",
    "PlanWritten",
    "RayExecutor",
    "RunTask",
    "RunsFailed",
    "SlurmExecutor",
    "execute",
    "make_executor",
]


def make_executor(settings: CompareConfig, out: Path, jobs: int = 1) -> Executor:
    """The executor that ``settings.executor`` names; ``out``: the compare's folder (the
    SLURM jobs' logs go to ``out/slurm``); ``jobs``: the local executor's processes."""
    if settings.executor == "ray":
        return RayExecutor(settings)
    if settings.executor == "slurm":
        return SlurmExecutor(settings, Path(out) / "slurm")
    return LocalExecutor(jobs, settings.cpus_per_run)
