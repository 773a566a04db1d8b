"""What ``lymphdx report`` reads from a run folder or a compare folder: each run's
config, metrics, detection scores, history and test predictions (``Run``), the compare
folder's ``results.json`` and per-seed test predictions (``Inputs``), the scores averaged
over seeds and the evaluation settings the runs were scored with."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import path_problem, read_csv
from lymphdx.engine.run_state import run_notes, stale_reason
from lymphdx.reporting.runs import Run, natural_key, strategy_order
from lymphdx.workflows.evaluate import read_predictions

__all__ = [
    "Inputs",
    "folder_kind",
    "read_json",
    "load_run",
    "load_inputs",
    "seed_averaged",
    "evaluation_settings",
    "stale_notes",
]


@dataclass
class Inputs:
    """A run or compare folder as the report reads it."""

    folder: Path
    kind: str  # "compare" or "run"
    results: dict[str, Any] | None
    runs: list[Run]
    # strategy -> seed key -> patient_id -> (label, probability)
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]]


def folder_kind(folder: str | Path) -> str:
    """``"compare"`` (has ``results.json``) or ``"run"`` (has ``config.yaml``)."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = path_problem(folder)  # missing, a dangling link, a loop of links
        raise LymphdxError(f"{folder} is not a folder" + (f": it {problem}" if problem else ""))
    if (folder / "results.json").is_file():
        return "compare"
    if (folder / "config.yaml").is_file():
        return "run"
    raise LymphdxError(
        f"{folder} is neither a lymphdx compare folder (no results.json) nor a run folder "
        "(no config.yaml); give the --out folder of `lymphdx compare` or `lymphdx train`"
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's mapping; None if there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LymphdxError(f"cannot read {path}: {err}") from None


def load_run(path: Path, root: Path) -> Run:
    """The run folder ``path``, named by its place under ``root``."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LymphdxError(f"cannot read {path / 'config.yaml'}: {err}") from None
    strategy = str(config.get("strategy", "?"))
    seed = int(config.get("seed", 0))
    if path == root:
        name = f"seed{seed}"
    else:
        parts = [p for p in path.relative_to(root).parts if p not in ("runs", "cv", strategy)]
        name = "/".join(parts) or f"seed{seed}"
    preds_path = path / "predictions_test.csv"
    return Run(
        path=path,
        name=name,
        config=config,
        strategy=strategy,
        seed=seed,
        metrics=read_json(path / "metrics.json"),
        detection=read_json(path / "detection.json"),
        history=read_csv(path / "history.csv"),
        predictions=read_predictions(preds_path) if preds_path.is_file() else None,
    )


def load_inputs(folder: Path) -> Inputs:
    """A run folder (with its test predictions) or a compare folder and all its runs."""
    kind = folder_kind(folder)
    if kind == "run":
        run = load_run(folder, folder)
        if run.predictions is None:
            raise LymphdxError(
                f"run folder {folder} has no predictions_test.csv; run "
                f"`lymphdx evaluate {folder}` first"
            )
        return Inputs(folder, kind, None, [run], {run.strategy: {str(run.seed): run.predictions}})
    results = read_json(folder / "results.json") or {}
    if "strategies" not in results:
        raise LymphdxError(f"{folder / 'results.json'} has no 'strategies'")
    preferred = list(results["strategies"])
    runs = [
        load_run(p.parent, folder)
        for p in folder.rglob("config.yaml")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    order = strategy_order([r.strategy for r in runs] + preferred, preferred)
    runs.sort(key=lambda r: (order.index(r.strategy), natural_key(r.name)))
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]] = {}
    rows = read_csv(folder / "test_predictions.csv")
    if rows:
        for r in rows:
            predictions.setdefault(r["strategy"], {}).setdefault(r["seed"], {})[r["patient_id"]] = (
                int(r["label"]),
                float(r["probability"]),
            )
    else:  # an older compare folder: the runs' own per-patient files (CV: folds pooled)
        for run in runs:
            if run.predictions is not None:
                key = re.sub(r"(^|/)fold\d+(?=/|$)", "", run.name).strip("/") or run.name
                predictions.setdefault(run.strategy, {}).setdefault(key, {}).update(run.predictions)
    if not predictions:
        raise LymphdxError(f"{folder} has no test_predictions.csv and no run predictions")
    predictions = {s: predictions[s] for s in strategy_order(list(predictions), preferred)}
    return Inputs(folder, kind, results, runs, predictions)


def seed_averaged(
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]],
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Patients (sorted), labels and each strategy's probability averaged over seeds.

    Only patients that every strategy and seed scored are kept (all of them, for the
    output of ``compare``)."""
    common: set[str] | None = None
    labels: dict[str, int] = {}
    for by_seed in predictions.values():
        for rows in by_seed.values():
            common = set(rows) if common is None else common & set(rows)
            labels.update({p: lab for p, (lab, _) in rows.items()})
    patients = sorted(common or ())
    if not patients:
        raise LymphdxError("no test patient is scored by every strategy and seed")
    y = np.array([labels[p] for p in patients], dtype=int)
    scores = {
        s: np.mean([[rows[p][1] for p in patients] for rows in by_seed.values()], axis=0)
        for s, by_seed in predictions.items()
    }
    return patients, y, scores


def evaluation_settings(runs: list[Run]) -> tuple[int, float]:
    """Bootstrap resamples and CI level of the first run that sets them (else 2000, 0.95)."""
    for r in runs:
        ev = r.config.get("evaluation") or {}
        if "bootstrap" in ev:
            return int(ev["bootstrap"]), float(ev.get("ci", 0.95))
    return 2000, 0.95


def stale_notes(inp: Inputs) -> list[str]:
    """What the report must say about runs whose scores are not those of their current
    ``checkpoints/best.pt``: a process is still training them, they were trained further
    since they were scored (``results.json`` of a compare folder, else ``metrics.json``;
    and ``detection.json``), or their training stopped early. Empty when all is current."""
    recorded = (inp.results or {}).get("checkpoints") if inp.kind == "compare" else None
    notes: list[str] = []
    for run in inp.runs:
        if inp.kind == "compare":
            rel = run.path.relative_to(inp.folder).as_posix()
            record = recorded.get(rel) if isinstance(recorded, dict) else None
            notes += run_notes(run.path, record, inp.folder / "results.json")
        elif run.metrics is not None:
            notes += run_notes(run.path, run.metrics.get("checkpoint"), run.path / "metrics.json")
        if run.detection is not None:
            path = run.path / "detection.json"
            why = stale_reason(run.path, run.detection.get("checkpoint"), path)
            notes += [why] if why else []
    return list(dict.fromkeys(notes))
