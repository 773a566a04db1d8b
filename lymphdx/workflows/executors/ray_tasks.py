"""``compare --executor ray``: each run a Ray task with its CPU and GPU share
(``compare.cpus_per_run``, ``gpus_per_run``), on a running cluster
(``compare.ray.address``, ``--ray-address``) or on a local Ray started for this compare.
Ray is an optional extra (``pip install 'lymphdx[ray]'``); the cluster's nodes need
lymphdx installed and the run folders (``--out``), manifests and scans on a shared file
system."""

from __future__ import annotations

import os

from lymphdx.core.config import CompareConfig
from lymphdx.core.errors import LymphdxError
from lymphdx.workflows.executors.base import (
    Outcome,
    RunTask,
    announce,
    cores,
    crashed,
    execute,
    need_extra,
)

__all__ = ["RayExecutor"]


class RayExecutor:
    """Every run a ``ray.remote`` task (``execute``) with ``num_cpus`` = ``cpus_per_run``
    (default 1; also its torch threads) and ``num_gpus`` = ``gpus_per_run``; no retries
    (a failed or killed run is reported, and the same compare again resumes it)."""

    name = "ray"
    parallel = True

    def __init__(self, settings: CompareConfig) -> None:
        self.settings = settings
        self.warms_cache = settings.ray.address is None  # a local Ray: this machine

    def _start(self, ray) -> bool:  # noqa: ANN001 (the ray module)
        """Join the cluster, or start a local Ray; whether this call started it."""
        if ray.is_initialized():
            return False
        s = self.settings
        if s.ray.address:
            ray.init(address=s.ray.address, log_to_driver=False)
            return True
        cpus = s.ray.cpus or cores()
        if (s.cpus_per_run or 1) > cpus:
            raise LymphdxError(
                f"cpus_per_run {s.cpus_per_run} is more than the local Ray's {cpus} CPUs "
                "(compare.ray.cpus): no run could start"
            )
        # Ray starts its workers at niceness 15 (RAY_worker_niceness): on a machine shared
        # with other work that starves the trainings (measured beside 4 other jobs: the
        # Ray runs barely moved). A local Ray of this compare runs them at the caller's
        # priority unless the user set the variable.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        return True

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]:
        ray = need_extra("ray", "ray", "compare --executor ray")
        started = self._start(ray)
        try:
            threads = self.settings.cpus_per_run or 1
            remote = ray.remote(execute).options(
                num_cpus=threads, num_gpus=self.settings.gpus_per_run, max_retries=0
            )
            refs = {remote.remote(task, threads): task for task in tasks}
            if progress:
                where = self.settings.ray.address or "a local Ray"
                print(
                    f"[compare] {len(tasks)} runs as Ray tasks on {where}, {threads} CPU(s)"
                    f" and {self.settings.gpus_per_run:g} GPU(s) each",
                    flush=True,
                )
            outcomes, pending = [], list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        outcome = ray.get(ref)
                    except Exception as err:  # the worker died, or the task could not run
                        outcome = crashed(refs[ref], err)
                    outcomes.append(outcome)
                    if progress:
                        announce(outcome, f"({outcome.host})")
            return outcomes
        finally:
            if started:
                ray.shutdown()
