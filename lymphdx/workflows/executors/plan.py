"""``compare --plan`` and ``compare --collect``: the runs for any other scheduler.

``--plan FILE|-`` writes one shell line per unfinished run, each runnable as it is and
again after an interruption: ``lymphdx train --out RUN --resume && lymphdx evaluate RUN``.
Each run folder gets what that needs first: its ``config.yaml`` (the compare's config for
that strategy and seed, manifests as absolute paths) and, under ``--cv``, its fold's
``splits.csv``. ``--collect`` builds the table from the run folders once every run has
finished, and otherwise names the runs that have not."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from lymphdx.core.config import dump_config
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_text
from lymphdx.engine.run_data import resolve_manifests
from lymphdx.engine.run_state import busy_note, epochs_done
from lymphdx.workflows.executors.base import Outcome, RunTask

__all__ = ["CollectExecutor", "PlanExecutor", "PlanWritten", "plan_line"]


class PlanWritten(Exception):  # noqa: N818 (not an error: compare stops after the plan)
    """The plan is written; ``compare`` stops before the table (``count`` lines into
    ``target``, ``"-"`` for stdout)."""

    def __init__(self, count: int, target: str) -> None:
        self.count, self.target = count, target
        super().__init__(f"{count} run(s) planned into {target}")


def plan_line(run_dir: Path, program: str = "lymphdx") -> str:
    """The shell line that trains (or resumes) ``run_dir`` and scores it on the test split."""
    run = shlex.quote(str(run_dir))
    return f"{program} train --out {run} --resume && {program} evaluate {run}"


class PlanExecutor:
    """Writes the lines of the unfinished runs to ``target`` (a file, or ``"-"``: stdout)
    and raises ``PlanWritten``; trains nothing."""

    name = "plan"
    parallel = warms_cache = False

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]:
        lines = []
        for task in tasks:
            config_yaml = task.run_dir / "config.yaml"
            if not config_yaml.exists():  # an interrupted run keeps its own
                config = resolve_manifests(task.config, task.weak_csv, task.strong_csv)
                write_text(config_yaml, dump_config(config))
            lines.append(plan_line(task.run_dir.resolve()))
        text = "".join(f"{line}\n" for line in lines)
        if self.target == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_text(self.target, text)
        raise PlanWritten(len(lines), self.target)


def run_state(run_dir: Path) -> str:
    """Where an unfinished run stands, in a few words."""
    busy = busy_note(run_dir)
    if busy is not None:
        return busy.removeprefix(f"run {run_dir} is ")
    done, planned = epochs_done(run_dir)
    if not (run_dir / "config.yaml").exists():
        return "not started"
    if planned is not None and done >= planned:
        return "trained, not scored (lymphdx evaluate)"
    return f"{done} of {planned} epochs" if planned else f"{done} epochs"


class CollectExecutor:
    """Trains nothing: refuses, naming them, when any run has not finished; otherwise
    ``compare`` goes on to build the table from the run folders."""

    name = "collect"
    parallel = warms_cache = False

    def run(self, tasks: list[RunTask], progress: bool) -> list[Outcome]:
        if tasks:
            listed = "\n".join(f"- {t.what}: {t.run_dir} ({run_state(t.run_dir)})" for t in tasks)
            raise LymphdxError(
                f"cannot --collect: {len(tasks)} run(s) have not finished (train and "
                f"evaluate them, e.g. by the lines of --plan):\n{listed}"
            )
        return []
