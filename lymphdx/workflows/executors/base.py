"""What every executor shares: a run to train (``RunTask``), what became of it
(``Outcome``), ``execute`` (the one function that a worker process, a Ray task or a SLURM
job calls: ``run_one``, its failure caught and described), and the report of failed runs.

A run's failure never stops the others: ``execute`` returns it as an ``Outcome``; a worker
that dies (killed, out of memory, past its time) is described by the executor from the
run's ``train.log`` (``crashed``). Run folders hold all state, so the same compare again
skips finished runs and resumes interrupted ones, wherever they ran."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lymphdx.core.config import Config
from lymphdx.core.errors import LymphdxError

__all__ = [
    "Executor",
    "Outcome",
    "RunTask",
    "RunsFailed",
    "announce",
    "crashed",
    "execute",
    "log_tail",
    "need_extra",
]

TAIL_LINES = 12  # lines of a failed run's log in the report


@dataclass(frozen=True)
class RunTask:
    """One run of a comparison: ``config`` trained into ``run_dir`` on the two manifests,
    then scored on the test split (``run_one``); ``what`` names it in messages."""

    config: Config
    run_dir: Path
    what: str
    weak_csv: Path
    strong_csv: Path
    progress: bool = False  # the training's progress bar (in-process runs only)


@dataclass
class Outcome:
    """What became of a ``RunTask``: ``ok``, or ``error`` (one line) with ``log_tail``
    (the last lines of its log, or of the worker's stderr); ``seconds`` spent in
    ``execute`` (``None`` when the worker died) and the ``host`` it ran on."""

    what: str
    run_dir: str
    ok: bool
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    seconds: float | None = None
    host: str | None = None


class Executor(Protocol):
    """Trains ``RunTask`` s somewhere and waits for all of them: one ``Outcome`` per task,
    in any order. ``parallel``: whether runs train side by side (then ``compare`` submits
    the longest first); ``warms_cache``: whether ``compare`` fills the preprocessing cache
    here first (not on a cluster's login node: its jobs fill it)."""

    name: str
    parallel: bool
    warms_cache: bool

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]: ...


def log_tail(path: str | Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a text file; none when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


class _Tail(logging.Handler):
    """Keeps the last records of the ``lymphdx`` logger: a run refused before its first
    epoch removes its ``train.log``, and this is then its log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def execute(task: RunTask, threads: int | None = None) -> Outcome:
    """Train and score ``task`` (``compare_runs.run_one``) in this process, with
    ``threads`` torch threads (``None``: as it is); an exception becomes a failed
    ``Outcome`` with the end of the run's log and of the traceback. Ctrl-C still stops."""
    from lymphdx.workflows.compare_runs import run_one

    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    logger = logging.getLogger("lymphdx")
    tail = _Tail()  # the logger is at INFO once training opens its log
    logger.addHandler(tail)
    host = socket.gethostname()
    try:
        run_one(task.config, task.run_dir, task.weak_csv, task.strong_csv, task.progress)
    except Exception as err:  # the others go on; the report names this one
        lines = log_tail(task.run_dir / "train.log") or list(tail.lines)
        if not isinstance(err, LymphdxError):  # where an unexpected error came from
            lines += [s.rstrip() for s in traceback.format_exception(err)[-3:-1]]
        return Outcome(
            task.what,
            str(task.run_dir),
            False,
            _one_line(err),
            lines,
            time.perf_counter() - start,
            host,
        )
    finally:
        logger.removeHandler(tail)
    return Outcome(
        task.what, str(task.run_dir), True, seconds=time.perf_counter() - start, host=host
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def crashed(task: RunTask, err: BaseException, stderr: list[str] | None = None) -> Outcome:
    """The ``Outcome`` of a task whose worker died or whose result never came back
    (``err``: the executor's error): the end of its ``train.log``, else of ``stderr``."""
    lines = log_tail(task.run_dir / "train.log") or list(stderr or [])[-TAIL_LINES:]
    return Outcome(task.what, str(task.run_dir), False, _one_line(err), lines)


class RunsFailed(LymphdxError):
    """Some runs of a comparison failed (the others finished and are kept)."""

    def __init__(self, failed: list[Outcome], total: int) -> None:
        self.failed = failed
        count = f"all {total}" if len(failed) == total else f"{len(failed)} of {total}"
        if len({o.error for o in failed}) == 1:  # one cause: the first line says it
            head = f"{count} runs failed: {failed[0].error}"
        else:
            head = f"{count} runs failed, e.g. {failed[0].what}: {failed[0].error}"
        lines = [
            head,
            "No table was written; the runs that finished are kept. Fix the cause and run the "
            "same compare again: it trains only these (an interrupted one goes on from its "
            "last epoch).",
        ]
        for o in failed:
            lines.append(f"- {o.what} ({o.run_dir}){f' on {o.host}' if o.host else ''}: {o.error}")
            if o.log_tail:
                lines.append("  its log ends:")
                lines.extend(f"  | {line}" for line in o.log_tail)
        super().__init__("\n".join(lines))


def announce(outcome: Outcome, where: str) -> None:
    """The progress line of a finished run: done or FAILED, the run and ``where`` it ran."""
    state = "done" if outcome.ok else "FAILED"
    print(f"[compare] {state}: {outcome.what} {where}", flush=True)


def need_extra(module: str, extra: str, what: str):  # noqa: ANN201 (a module)
    """Import ``module`` (an optional dependency) or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LymphdxError(
            f"{what} needs the {module} package, which is not installed: "
            f"pip install 'lymphdx[{extra}]'"
        ) from None


def cores() -> int:
    """The cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
