"""Calibrated probabilities and the operating point of a run or a cross-validation.

A run (``evaluate``): the map (``evaluation.calibration``) and the threshold
(``evaluation.operating_point``) are fitted on the run's validation patients, scored the
same way as its test patients, and kept in ``RUN/calibration.json`` (``fit_run_calibration``);
``evaluate`` applies them to the test patients and ``predict`` to new scans
(``read_run_calibration``). A ``compare --cv`` (``cv_calibration``): the pooled
out-of-fold predictions are cross-fitted (each fold through a map and a threshold fitted
on the other folds of its repeat × seed), and one map fitted on all of them is kept per
row in ``OUT/calibration/<name>.json``.

AUCs are computed from the uncalibrated scores throughout: a Platt map keeps the ranking
exactly, an isotonic one ties the scores of a step (``stats.calibration``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import Config
from lymphdx.core.files import write_json
from lymphdx.engine.run_state import stale_reason
from lymphdx.stats.calibration import (
    Recalibration,
    calibration_stats,
    cross_fitted,
    fit_recalibration,
    small_set_warning,
)
from lymphdx.stats.operating_point import at_threshold, choose_threshold, describe_target

__all__ = [
    "CALIBRATION_FILE",
    "calibration_on_test",
    "cv_calibration",
    "split_calibration",
    "fit_run_calibration",
    "read_run_calibration",
]

CALIBRATION_FILE = "calibration.json"


def _fitted_on(y: np.ndarray, what: str) -> dict[str, Any]:
    events = int(np.sum(y))
    return {"patients": what, "n": int(len(y)), "events": events, "non_events": len(y) - events}


def _threshold(
    config: Config, y: np.ndarray, q: np.ndarray, fallback_note: str = ""
) -> dict[str, Any]:
    """``choose_threshold`` for ``evaluation.operating_point`` on labels ``y`` and
    calibrated probabilities ``q``; ``evaluation.threshold`` (with a note) without both
    classes."""
    target = config.evaluation.operating_point
    what, value = describe_target(target)
    threshold = config.evaluation.threshold
    if 0 < int(np.sum(y)) < len(y):
        chosen = choose_threshold(y, q, target)
        if what != "youden" or chosen["sensitivity"] + chosen["specificity"] > 1.0:
            return {**chosen, "note": None}
        # no threshold does better than chance there: Youden's maximum would be a cut
        # above every probability (nobody positive), which is no choice at all
        return {
            **chosen,
            "threshold": threshold,
            "sensitivity": float(np.mean(q[y == 1] >= threshold)),
            "specificity": float(np.mean(q[y == 0] < threshold)),
            "note": (
                f"no threshold separates the {len(y)} calibration patients better than chance "
                f"(Youden's J <= 0): evaluation.threshold {threshold} is used"
            ),
        }
    return {
        "target": what,
        "value": value,
        "threshold": threshold,
        "sensitivity": None,
        "specificity": None,
        "note": (
            f"the {len(y)} calibration patients are all of one class: no {what} threshold "
            f"can be chosen, evaluation.threshold {threshold} is used{fallback_note}"
        ),
    }


def fit_run_calibration(
    config: Config, y: np.ndarray, p: np.ndarray, checkpoint: Any, split: str = "val"
) -> dict[str, Any]:
    """``calibration.json`` of a run: the map fitted on its ``split`` patients' labels
    ``y`` ``(N,)`` and uncalibrated probabilities ``p`` ``(N,)``, the operating point
    chosen on their calibrated probabilities, the before/after statistics on them, and
    the ``checkpoint`` scored (``predict`` checks it against ``best.pt``)."""
    ev = config.evaluation
    fitted = fit_recalibration(ev.calibration, y, p)
    q = fitted(p)
    on = _fitted_on(y, f"the weak set's {split} split")
    return {
        **fitted.to_json(),
        "fitted_on": on,
        "warning": small_set_warning(on["events"], on["non_events"]),
        "operating_point": _threshold(config, y, q),
        "before": calibration_stats(y, p, ev.bootstrap, ev.ci, config.seed),
        "after": calibration_stats(y, q, ev.bootstrap, ev.ci, config.seed),
        "checkpoint": checkpoint,
    }


def calibration_on_test(
    config: Config, record: dict[str, Any], y: np.ndarray, p: np.ndarray, q: np.ndarray
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics.json``'s ``calibration`` (before/after statistics on the test patients:
    labels ``y``, uncalibrated ``p``, calibrated ``q``, all ``(N,)``) and
    ``operating_point`` (``record``'s threshold read on them)."""
    ev = config.evaluation
    op = record["operating_point"]
    calibration = {
        "method": record["method"],
        "requested": record["requested"],
        "note": record["note"],
        "fitted_on": record["fitted_on"],
        "warning": record["warning"],
        "before": calibration_stats(y, p, ev.bootstrap, ev.ci, config.seed),
        "after": calibration_stats(y, q, ev.bootstrap, ev.ci, config.seed),
    }
    point = {
        "target": op["target"],
        "value": op["value"],
        "chosen_on": record["fitted_on"]["patients"],
        "note": op.get("note"),
        **at_threshold(y, q, op["threshold"], ev.ci),
    }
    return calibration, point


def read_run_calibration(
    run_dir: str | Path, which: str = "best"
) -> tuple[Recalibration, dict[str, Any] | None, str | None]:
    """The map of run ``run_dir``'s ``which`` weights, its ``calibration.json`` record and
    a note when there is none to apply: the identity and ``None`` for a run evaluated
    before calibration existed, for weights other than ``best`` and for a file fitted on
    an earlier ``best.pt``."""
    path = Path(run_dir) / CALIBRATION_FILE
    identity = Recalibration("none")
    if which != "best":
        return identity, None, f"uncalibrated: {CALIBRATION_FILE} belongs to best.pt, not {which}"
    if not path.is_file():
        return (
            identity,
            None,
            f"uncalibrated: the run has no {CALIBRATION_FILE} (evaluated by an older lymphdx); "
            f"`lymphdx evaluate {run_dir}` fits it",
        )
    record = json.loads(path.read_text())
    stale = stale_reason(run_dir, record.get("checkpoint"), path)
    if stale is not None:
        return identity, None, f"uncalibrated: {stale}; `lymphdx evaluate {run_dir}` refits it"
    return Recalibration.from_json(record), record, None


def _fold_of(folds: list[tuple[int, int, dict[str, str]]], repeat: int) -> dict[str, int]:
    """``{patient: the fold whose test split holds it}`` in repeat ``repeat``."""
    return {
        pid: f
        for r, f, assignment in folds
        if r == repeat
        for pid, split in assignment.items()
        if split == "test"
    }


def _cross_fitted_run(
    config: Config, rows: dict[str, tuple[int, float]], fold_of: dict[str, int]
) -> tuple[dict[str, Any], dict[str, float]]:
    """One repeat × seed's out-of-fold rows calibrated by cross-fitting: map and threshold
    of each fold fitted on the other folds, statistics on all patients; and each
    patient's calibrated probability."""
    ev = config.evaluation
    ids = sorted(rows)
    y = np.array([rows[i][0] for i in ids], dtype=int)
    p = np.array([rows[i][1] for i in ids], dtype=float)
    groups = np.array([fold_of[i] for i in ids])
    q, maps = cross_fitted(y, p, groups, ev.calibration)
    thresholds = np.empty_like(q)
    per_fold = []
    for g, fitted in zip(np.unique(groups), maps, strict=True):
        other = groups != g
        chosen = _threshold(config, y[other], fitted(p[other]))
        thresholds[groups == g] = chosen["threshold"]
        per_fold.append({"fold": int(g), "map": fitted.to_json(), "operating_point": chosen})
    what, value = describe_target(ev.operating_point)
    point = at_threshold(y, q - thresholds, 0.0, ev.ci)  # each patient at its fold's threshold
    point["threshold"] = None  # one per fold (``folds``)
    events = int(y.sum())
    record = {
        "n": len(y),
        "events": events,
        "warning": small_set_warning(events, len(y) - events),
        "before": calibration_stats(y, p, ev.bootstrap, ev.ci, config.seed),
        "after": calibration_stats(y, q, ev.bootstrap, ev.ci, config.seed),
        "operating_point": {"target": what, "value": value, **point},
        "folds": per_fold,
    }
    return record, dict(zip(ids, q.tolist(), strict=True))


def cv_calibration(
    config: Config,
    oof: dict[str, dict[str, dict[str, tuple[int, float]]]],
    folds: list[tuple[int, int, dict[str, str]]],
    out: Path,
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, float]]]]:
    """``results.json``'s ``calibration`` of a cross-validation: per row of ``oof``
    (``{name: {"r<r>s<s>": {patient: (label, p)}}}``) and repeat × seed the cross-fitted
    before/after statistics and operating point on all patients; and per row one map
    with its threshold fitted on all its out-of-fold predictions, written to
    ``out/calibration/<name>.json`` (for fold ensembles). Also returns the cross-fitted
    probabilities ``{name: {"r<r>s<s>": {patient: p}}}``."""
    ev = config.evaluation
    results: dict[str, Any] = {}
    calibrated: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_key in oof.items():
        runs = {}
        for key, rows in by_key.items():
            repeat = int(key[1:].partition("s")[0])
            runs[key], calibrated.setdefault(name, {})[key] = _cross_fitted_run(
                config, rows, _fold_of(folds, repeat)
            )
        y = np.array([v[0] for rows in by_key.values() for v in rows.values()], dtype=int)
        p = np.array([v[1] for rows in by_key.values() for v in rows.values()], dtype=float)
        fitted = fit_recalibration(ev.calibration, y, p)
        on = _fitted_on(y, "the pooled out-of-fold predictions of every repeat and seed")
        record = {
            **fitted.to_json(),
            "fitted_on": on,
            "warning": small_set_warning(on["events"], on["non_events"]),
            "operating_point": _threshold(config, y, fitted(p)),
        }
        write_json(out / "calibration" / f"{name}.json", record)
        results[name] = {
            "mode": "the other folds' out-of-fold predictions (cross-fitting)",
            "method": ev.calibration,
            "file": f"calibration/{name}.json",
            "runs": runs,
        }
    return results, calibrated


def split_calibration(run_dirs: dict[str, list[Path]], out: Path) -> dict[str, Any]:
    """``results.json``'s ``calibration`` of a comparison on the fixed split: per strategy
    and run, the ``calibration`` and ``operating_point`` of its ``metrics.json`` (on the
    test patients, with the map and threshold fitted on the run's validation patients);
    runs scored before calibration existed are left out."""
    results: dict[str, Any] = {}
    for name, dirs in run_dirs.items():
        runs = {}
        for d in dirs:
            path = d / "metrics.json"
            metrics = json.loads(path.read_text()) if path.is_file() else {}
            if "calibration" not in metrics:
                continue
            runs[d.relative_to(out).as_posix()] = {
                **{k: metrics["calibration"][k] for k in ("before", "after", "warning")},
                "n": metrics["n"],
                "events": metrics["n_pos"],
                "fitted_on": metrics["calibration"]["fitted_on"],
                "method": metrics["calibration"]["method"],
                "operating_point": metrics["operating_point"],
            }
        if runs:
            method = next(iter(runs.values()))["method"]
            results[name] = {"mode": "each run's validation split", "method": method, "runs": runs}
    return results
