"""``compare --jobs N`` starts the runs longest first (``expected_cost``), so that a long
run does not start last while the other workers idle; one process runs them in order."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from lymphdx.core.config import Config, validate
from lymphdx.workflows import compare, compare_runs
from lymphdx.workflows.executors import Outcome, RunTask, local
from tests.conftest import tiny_config


def _config(tmp_path: Path, strategy: str, epochs: int = 2) -> Config:
    data = tiny_config(tmp_path, training={"epochs": epochs}).model_dump(mode="json")
    return validate({**data, "strategy": strategy})


def test_expected_cost_ranks_the_strategies_as_measured(tmp_path: Path) -> None:
    # the 14-epoch demo's training seconds (docs/dev-log-2026-11-25_to_2026-12-03.md §2):
    # 343 / 454 / 438 / 549
    cost = {s: compare.expected_cost(_config(tmp_path, s)) for s in compare.PAPER_STRATEGIES}
    assert cost["supervised"] == pytest.approx(2 * 1.0)
    assert cost["semi-supervised"] == pytest.approx(2 * 1.3)
    assert cost["multitask"] == pytest.approx(2 * 1.3)
    assert cost["ssmdmt"] == pytest.approx(2 * 1.6)
    # more epochs cost more, whatever the strategy
    assert compare.expected_cost(_config(tmp_path, "supervised", epochs=4)) > cost["ssmdmt"]


class _Pool:
    """A stand-in for ProcessPoolExecutor that records the order of submission."""

    submitted: list[Path] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _Pool.submitted = []

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def submit(self, fn: Any, task: RunTask, threads: int) -> Future:
        _Pool.submitted.append(task.run_dir)
        done: Future = Future()
        done.set_result(Outcome(task.what, str(task.run_dir), True))
        return done


def test_run_all_submits_the_longest_runs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "ProcessPoolExecutor", _Pool)
    monkeypatch.setattr(compare, "load_manifests", lambda *a: None)  # none here
    monkeypatch.setattr(compare, "_warm_cache", lambda *a: None)
    order = ["supervised", "semi-supervised", "multitask", "ssmdmt"]
    runs = [(_config(tmp_path, s), tmp_path / s, s) for s in order]
    compare.run_all(runs, tmp_path / "w.csv", tmp_path / "s.csv", progress=False, jobs=2)
    names = [p.name for p in _Pool.submitted]
    assert names[0] == "ssmdmt" and names[-1] == "supervised"
    assert set(names[1:3]) == {"semi-supervised", "multitask"}
    # ties keep the given order (a stable sort)
    assert names[1:3] == ["semi-supervised", "multitask"]


def test_one_job_runs_in_the_given_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(compare, "load_manifests", lambda *a: None)  # none here
    monkeypatch.setattr(
        compare_runs, "run_one", lambda config, run_dir, *a: seen.append(run_dir.name)
    )
    order = ["supervised", "ssmdmt", "multitask"]
    runs = [(_config(tmp_path, s), tmp_path / s, s) for s in order]
    compare.run_all(runs, tmp_path / "w.csv", tmp_path / "s.csv", progress=False, jobs=1)
    assert seen == order
