"""``compare --executor local`` (the default): the runs in this process one after the
other, or with ``--jobs N`` in N spawned processes, each with its share of the cores."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed

from lymphdx.workflows.executors.base import Outcome, RunTask, announce, cores, crashed, execute

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """``jobs`` runs at once on this machine, each with ``cpus_per_run`` torch threads
    (``None``: the cores / ``jobs``); one job runs them here, in the given order, with the
    training's progress bar."""

    name = "local"

    def __init__(self, jobs: int = 1, cpus_per_run: int | None = None) -> None:
        self.jobs = jobs
        self.cpus_per_run = cpus_per_run
        self.parallel = self.warms_cache = jobs > 1

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]:
        if not self.parallel or len(tasks) <= 1:
            outcomes = []
            for task in tasks:
                if progress:
                    print(f"[compare] {task.what} -> {task.run_dir}", flush=True)
                outcomes.append(execute(task, self.cpus_per_run))
            return outcomes
        threads = self.cpus_per_run or max(1, cores() // self.jobs)
        outcomes = []
        with ProcessPoolExecutor(
            self.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {pool.submit(execute, task, threads): task for task in tasks}
            if progress:
                print(
                    f"[compare] {len(tasks)} runs, {self.jobs} at a time, {threads} thread(s) each",
                    flush=True,
                )
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as err:  # the worker died (BrokenProcessPool)
                    outcome = crashed(futures[future], err)
                outcomes.append(outcome)
                if progress:
                    announce(outcome, f"-> {outcome.run_dir}")
        return outcomes
