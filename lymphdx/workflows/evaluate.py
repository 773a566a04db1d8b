"""Evaluate a trained run on one split of the weak set: ``metrics.json`` + per-patient CSV,
and the run's probability calibration and operating point (``calibration.json``).

The test split is scored once per run with the model in ``best`` (chosen as
``training.selection`` says: by default the one of best validation AUC); nothing here
feeds back into any choice.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import Config
from lymphdx.core.domains import WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import read_csv, run_lock, write_csv, write_json
from lymphdx.core.strategies import get_strategy
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.domain_stats import decoder_status_with_stats
from lymphdx.engine.inferer import make_inferer
from lymphdx.engine.propagation import predict_volumes
from lymphdx.engine.roi_readout import run_readout, score_volumes
from lymphdx.engine.roi_status import read_roi_status
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model, load_run_config
from lymphdx.engine.run_state import epochs_done, refuse_while_busy
from lymphdx.stats.calibration import Recalibration
from lymphdx.stats.metrics import auc, bootstrap_auc_ci, delong, sensitivity_specificity
from lymphdx.workflows.calibrate import (
    CALIBRATION_FILE,
    calibration_on_test,
    fit_run_calibration,
)
from lymphdx.workflows.detection import evaluate_detection

log = logging.getLogger("lymphdx")

__all__ = [
    "evaluate_run",
    "read_predictions",
    "predict_checkpoint",
]


def read_predictions(path: str | Path, calibrated: bool = False) -> dict[str, tuple[int, float]]:
    """``patient_id -> (label, probability)`` from a ``predictions_<split>.csv``: the
    uncalibrated probability (``probability_uncalibrated``; in older files and
    ``predict_checkpoint``'s, ``probability``), which every AUC is computed from, or with
    ``calibrated`` the calibrated one (``probability``)."""
    if not Path(path).is_file():
        raise LymphdxError(f"no predictions at {path}")
    rows = read_csv(path)
    column = "probability"
    if not calibrated and rows and "probability_uncalibrated" in rows[0]:
        column = "probability_uncalibrated"
    return {r["patient_id"]: (int(r["label"]), float(r[column])) for r in rows}


def _write_predictions(
    path: Path,
    ids: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    uncalibrated: np.ndarray | None = None,
) -> None:
    """``predictions_<split>.csv``: ``probability`` (calibrated when ``uncalibrated`` is
    given, which is then the ``probability_uncalibrated`` column)."""
    header = ["patient_id", "label", "probability"]
    columns = [probs] if uncalibrated is None else [probs, uncalibrated]
    if uncalibrated is not None:
        header.append("probability_uncalibrated")
    rows = (
        [pid, int(y), *(f"{float(c[i]):.6f}" for c in columns)]
        for i, (pid, y) in enumerate(zip(ids, labels, strict=True))
    )
    write_csv(path, header, rows, "\r\n")


def predict_checkpoint(
    run_dir: str | Path, which: str, split: str = "test"
) -> dict[str, tuple[int, float]]:
    """``patient_id -> (label, probability)`` of the weights in ``checkpoints/<which>.pt``
    (e.g. ``epoch_007``) on the weak set's ``split``; kept in
    ``predictions_<split>@<which>.csv`` so that a second call only reads it (until the
    ``evaluation`` settings change: ``compare`` then removes it)."""
    run_dir = Path(run_dir)
    path = run_dir / f"predictions_{split}@{which}.csv"
    if path.exists():
        return read_predictions(path)
    config, model, _ = load_model(run_dir, which)
    volumes = load_run_data(config, run_dir, need_strong=False).volumes("weak", split)
    if len(volumes) == 0:
        raise LymphdxError(f"the weak set of {run_dir} has no patients in split {split!r}")
    tta, inferer = config.evaluation.tta_flip, make_inferer(config)
    probs = predict_volumes(model, volumes, domain=WEAK, tta=tta, inferer=inferer)
    _write_predictions(path, list(volumes.patient_ids), volumes.labels, probs)
    return read_predictions(path)


@contextlib.contextmanager
def _quiet_numpy() -> Iterator[None]:
    """No numpy floating-point warnings (a variance of one patient, a mean of nothing):
    the statistics they concern come out NaN, written ``null`` in the JSON, and a warning
    from deep inside numpy would only bury ``evaluate``'s output."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _delong_se(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """DeLong's standard error of the AUC; ``None`` with fewer than 2 patients of a class
    (the sample variances of the placement values are then undefined)."""
    n_pos = int(labels.sum())
    if min(n_pos, len(labels) - n_pos) < 2:
        return None
    _, var = delong(labels, probs)
    se = float(np.sqrt(var))
    return se if np.isfinite(se) else None


def scoring_settings(config: Config) -> dict[str, Any]:
    """The sections of ``config`` that say how a run is scored, not trained
    (``evaluation``, ``inference``), as JSON; ``metrics.json`` records them."""
    return {k: config.model_dump(mode="json")[k] for k in ("evaluation", "inference")}


def evaluate_run(
    run_dir: str | Path, split: str = "test", detection: bool = True
) -> dict[str, Any]:
    """Score the ``best`` model on the weak set's ``split``; writes ``metrics.json`` and
    ``predictions_<split>.csv`` into the run folder and returns the metrics. First the
    validation patients are scored the same way and ``calibration.json`` is fitted on them
    (``workflows.calibrate``: the map of ``evaluation.calibration`` and the threshold of
    ``evaluation.operating_point``); the split's probabilities are then calibrated
    (``probability``; ``probability_uncalibrated`` beside it), labelled at that threshold,
    and ``metrics.json`` holds the calibration before/after and the operating point on
    them. AUCs are those of the uncalibrated scores. For the test
    split of a strategy that trains the ROI decoder, also the detection evaluation
    (``detection.json``: Dice and lesion-level FROC on the strong set's test split and, for
    synthetic data, on the weak set's test split; ``detection=False`` skips it).

    Refused while another process trains (or evaluates) the run: it holds the run's lock
    while it scores, so that training cannot replace ``best.pt`` under it. The metrics
    record the checkpoint they came from (``checkpoint``: file, SHA-256, epoch), which
    ``compare`` and ``report`` check against the run's ``best.pt``."""
    run_dir = Path(run_dir)
    load_run_config(run_dir)  # not a run folder: said before any lock file is made
    refuse_while_busy(run_dir, "evaluate it")
    with run_lock(run_dir, "evaluating"):
        return _evaluate_run(run_dir, split, detection)


def _evaluate_run(run_dir: Path, split: str, detection: bool) -> dict[str, Any]:
    # the checkpoint is checked before any scan is read (load_model reads the scans only
    # to estimate evaluation.bn_stats: per_hospital the first time)
    config, model, state = load_model(run_dir)
    done, planned = epochs_done(run_dir)[0], config.training.epochs
    if done < planned:  # no process trains it (refuse_while_busy): it was stopped
        log.warning(
            "run %s stopped after %d of %d epochs: scoring the best.pt it has; finish it with "
            "`lymphdx train --out %s --resume`, then evaluate it again",
            run_dir,
            done,
            planned,
            run_dir,
        )
    data = load_run_data(config, run_dir, need_strong=False)
    volumes = data.volumes("weak", split)
    if len(volumes) == 0:
        raise LymphdxError(f"the weak set has no patients in split {split!r}")
    # with statistics re-estimated after training: the switches read the decoder as scored
    decoder_status_with_stats(run_dir, config, model, data)
    readout, readout_note = run_readout(run_dir, config, model, data)
    readout_metrics: dict[str, Any] = {"applied": readout is not None, "note": readout_note}
    tta, inferer = config.evaluation.tta_flip, make_inferer(config)

    def score(volumes: VolumeSet, record: dict[str, Any] | None = None) -> np.ndarray:
        """The scan probabilities ``(N,)`` of ``volumes``, uncalibrated; with ``record``
        each half's AUC is put in it."""
        if readout is None:
            return predict_volumes(model, volumes, domain=WEAK, tta=tta, inferer=inferer)
        classifier, features = score_volumes(model, volumes, tta, readout.read, inferer=inferer)
        combined = readout.combine(classifier, features).astype(np.float32)
        if record is not None:
            with _quiet_numpy():  # each half alone, for the record
                record["auc_classifier"] = auc(volumes.labels, classifier)
                record["auc_readout"] = auc(volumes.labels, readout.probability(features))
            record["train_auc_readout"] = readout.train_auc
            record["n_train"] = readout.n_train
            record["kind"] = readout.kind
            record["weight"] = readout.weight
        return combined

    probs = score(volumes, readout_metrics)
    labels = volumes.labels
    # the map and the threshold: fitted on the validation patients, scored the same way
    val = volumes if split == "val" else data.volumes("weak", "val")
    if len(val) == 0:
        raise LymphdxError(f"the weak set of {run_dir} has no validation patients to calibrate on")
    val_probs = probs if split == "val" else score(val)
    with _quiet_numpy():
        record = fit_run_calibration(config, val.labels, val_probs, state["source"])
    write_json(run_dir / CALIBRATION_FILE, record)
    calibrated = Recalibration.from_json(record)(probs)
    with _quiet_numpy():
        calibration, point = calibration_on_test(config, record, labels, probs, calibrated)
    threshold = point["threshold"]
    pred = (calibrated >= threshold).astype(int)
    # AUCs from the uncalibrated scores: the maps are monotone, but isotonic ties scores
    with _quiet_numpy():
        value = auc(labels, probs)
        ci = bootstrap_auc_ci(
            labels, probs, config.evaluation.bootstrap, config.evaluation.ci, seed=config.seed
        )
        se = _delong_se(labels, probs)
    sensitivity, specificity = sensitivity_specificity(labels, pred)
    metrics: dict[str, Any] = {
        "split": split,
        "n": int(len(labels)),
        "n_pos": int(labels.sum()),
        "auc": value,
        "auc_ci95": list(ci),
        # null when undefined: DeLong's variance needs 2 patients of each class
        "auc_se_delong": se,
        # the operating point (evaluation.operating_point, chosen on the validation
        # patients): label = calibrated probability >= threshold
        "threshold": threshold,
        "operating_point": point,
        # evaluation.calibration: before/after on these patients; the map in calibration.json
        "calibration": calibration,
        "tta_flip": bool(config.evaluation.tta_flip),
        "inferer": inferer.name,  # evaluation.inferer: how each scan was scored
        # evaluation.roi_readout: whether the probability averages the classifier with
        # the ROI map's regression, and each one's AUC alone
        "roi_readout": readout_metrics,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": float((pred == labels).mean()),
        "strategy": config.strategy,
        "seed": config.seed,
        "best_epoch": int(state["best"]["epoch"]),
        "best_val_auc": float(state["best"]["val_auc"]),
        # which weights best.pt holds (training.selection; older runs: best_val)
        "selection": str(state.get("selection", "best_val")),
        # the checkpoint scored (file, sha256, epoch): compare and report check it
        "checkpoint": state["source"],
        # the settings it was scored with: compare tells a rescoring stopped part-way
        "scored_with": scoring_settings(config),
    }
    # a run whose ROI decoder found nothing in the end says so (training.roi_status)
    status = read_roi_status(run_dir)
    if status is not None:
        metrics["roi_decoder"] = status
    if "swa_first_epoch" in state["best"]:  # the epochs SWA averaged
        metrics["swa_epochs"] = [int(state["best"]["swa_first_epoch"]), metrics["best_epoch"]]
    _write_predictions(
        run_dir / f"predictions_{split}.csv", list(volumes.patient_ids), labels, calibrated, probs
    )
    if detection and split == "test" and get_strategy(config.strategy).trains_decoder:
        with _quiet_numpy():
            detection = evaluate_detection(run_dir, loaded=(config, model, state))
        for name in ("strong_test", "weak_test"):
            if name in detection:
                metrics[f"{name}_dice"] = detection[name]["dice"]
                metrics[f"{name}_froc_mean_sensitivity"] = detection[name]["froc"][
                    "mean_sensitivity"
                ]
    if split == "test":
        write_json(run_dir / "metrics.json", metrics)
    else:
        write_json(run_dir / f"metrics_{split}.json", metrics)
    return metrics
