"""``compare --executor slurm``: the runs as one SLURM job array through submitit, each
job with ``compare.cpus_per_run`` CPUs, ``gpus_per_run`` GPUs, the partition and time
limit of ``compare.slurm``; the jobs' logs in ``OUT/slurm/<job id>_<task>_log.{out,err}``.
submitit is an optional extra (``pip install 'lymphdx[slurm]'``). Run compare on a login
node with ``--out``, the manifests and the scans on a file system the nodes share; it
waits for the array (under ``nohup``, ``tmux`` or ``screen``), or use ``--plan``."""

from __future__ import annotations

import shutil
from pathlib import Path

from lymphdx.core.config import CompareConfig
from lymphdx.core.errors import LymphdxError
from lymphdx.workflows.executors.base import (
    Outcome,
    RunTask,
    announce,
    crashed,
    execute,
    log_tail,
    need_extra,
)

__all__ = ["SlurmExecutor"]


class SlurmExecutor:
    """A submitit ``AutoExecutor`` job array (``map_array``) of ``execute``; with
    ``compare.slurm.cluster: local`` the same array as local processes (to try it)."""

    name = "slurm"
    parallel = True
    warms_cache = False

    def __init__(self, settings: CompareConfig, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = Path(log_dir)

    def _executor(self):  # noqa: ANN202 (a submitit executor)
        submitit = need_extra("submitit", "slurm", "compare --executor slurm")
        s = self.settings
        if s.slurm.cluster == "slurm" and shutil.which("sbatch") is None:
            raise LymphdxError(
                "compare --executor slurm found no sbatch here: run it on a SLURM login "
                "node (or set compare.slurm.cluster: local to try the job array on this "
                "machine, or use --plan for another scheduler)"
            )
        ex = submitit.AutoExecutor(folder=self.log_dir / "%j", cluster=s.slurm.cluster)
        params = {
            "name": "lymphdx-compare",
            "timeout_min": s.slurm.minutes,
            "cpus_per_task": s.cpus_per_run or 1,
            "gpus_per_node": int(s.gpus_per_run),
            "slurm_array_parallelism": s.slurm.array_parallelism,
            "slurm_partition": s.slurm.partition,
        }
        if s.slurm.setup:
            params["slurm_setup"] = list(s.slurm.setup)
        if s.slurm.additional:
            params["slurm_additional_parameters"] = dict(s.slurm.additional)
        ex.update_parameters(**params)
        return ex

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]:
        ex = self._executor()
        threads = self.settings.cpus_per_run or 1
        jobs = ex.map_array(execute, tasks, [threads] * len(tasks))
        if progress:
            print(
                f"[compare] {len(tasks)} runs as SLURM job array {jobs[0].job_id.split('_')[0]}"
                f" (logs in {self.log_dir})",
                flush=True,
            )
        outcomes = []
        for job, task in zip(jobs, tasks, strict=True):
            try:
                outcome = job.result()
            except Exception as err:  # killed, past its time, or never started
                outcome = crashed(task, err, _stderr(job))
            outcomes.append(outcome)
            if progress:
                announce(outcome, f"(job {job.job_id})")
        return outcomes


def _stderr(job) -> list[str]:  # noqa: ANN001 (a submitit job)
    """The end of a job's stderr file (none if it has none)."""
    try:
        return log_tail(job.paths.stderr)
    except Exception:  # a job that never started has no paths to read
        return []
