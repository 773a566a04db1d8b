"""The ``compare`` section: where ``lymphdx compare`` trains its runs (``executor``) and
what each run gets there. It changes no result, so a run trained under one executor is
reused under another (``run_folder.config_differences`` ignores it)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lymphdx.core.config_sections import _Section

EXECUTORS = ("local", "ray", "slurm")

# SLURM's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(text: str) -> int:
    """Minutes of a SLURM ``--time`` value (``"90"``, ``"4:00:00"``, ``"1-12"``,
    ``"2-00:00:00"``), rounded up; ``ValueError`` for anything else or zero."""
    m = _SLURM_TIME.match(str(text).strip())
    if m is None:
        raise ValueError(f"{text!r} is not a SLURM time: give minutes, H:MM:SS, D-HH or D-HH:MM:SS")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:
        # M, M:S, H:M:S
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:
        # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ValueError(f"time {text!r} is zero")
    return -(-seconds // 60)


class RayConfig(_Section):
    # a running cluster to join ("auto", "HOST:6379", "ray://HOST:10001"); None: start a
    # local Ray for this compare and stop it at the end
    address: str | None = None
    cpus: int | None = Field(None, ge=1)  # the local Ray's CPUs (None: all cores)


class SlurmConfig(_Section):
    partition: str | None = None  # None: the cluster's default partition
    time: str = "24:00:00"  # each run's time limit (SLURM's --time)
    array_parallelism: int = Field(256, ge=1)  # the job array's runs at once (--array=…%N)
    # "slurm": sbatch; "local": the same job array as processes on this machine (submitit's
    # local executor), to try a set-up before sending it to the cluster
    cluster: Literal["slurm", "local"] = "slurm"
    setup: list[str] = Field(default_factory=list)  # shell lines before each run (module load …)
    # more #SBATCH options by name, e.g. {account: lab, qos: high, mem: 32G}
    additional: dict[str, str | int] = Field(default_factory=dict)

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        slurm_minutes(v)
        return v

    @property
    def minutes(self) -> int:
        return slurm_minutes(self.time)


class CompareConfig(_Section):
    executor: Literal[EXECUTORS] = "local"  # type: ignore[valid-type]
    # CPU cores of one run (its torch threads); None: local: the cores / --jobs; ray, slurm: 1
    cpus_per_run: int | None = Field(None, ge=1)
    gpus_per_run: float = Field(0.0, ge=0.0)  # Ray may share a GPU (0.5); SLURM takes whole GPUs
    ray: RayConfig = Field(default_factory=RayConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _whole_gpus_on_slurm(self) -> CompareConfig:
        if self.executor == "slurm" and self.gpus_per_run != int(self.gpus_per_run):
            raise ValueError(
                f"gpus_per_run {self.gpus_per_run:g}: SLURM gives whole GPUs (Ray may share one)"
            )
        return self
