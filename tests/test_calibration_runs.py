"""Calibrated probabilities and the operating point through ``evaluate``, ``predict`` and
``compare`` (``workflows.calibrate``): ``calibration.json``, ``metrics.json``'s
``calibration`` and ``operating_point``, ``prediction.json``'s fields, the cross-fitted
calibration of ``compare --cv``, the config keys, and AUCs that calibration leaves alone."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import brier_score_loss, roc_auc_score

from lymphdx.core.config import load_config
from lymphdx.core.errors import ConfigError
from lymphdx.stats.calibration import Recalibration, fit_recalibration, wilson_interval
from lymphdx.workflows.compare import compare
from lymphdx.workflows.evaluate import evaluate_run
from lymphdx.workflows.predict import predict
from tests.conftest import tiny_config
from tests.helpers import manifests, one_thread  # noqa: F401  (autouse: one thread)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def split_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A compare folder of one supervised run (one epoch) on the fixed split; the run."""
    tmp = tmp_path_factory.mktemp("calib_split")
    config = tiny_config(tmp, training={"epochs": 1})
    out = tmp / "cmp"
    compare(config, *manifests(tiny_data), out, ["supervised"], [0], progress=False)
    return out, out / "runs" / "supervised" / "seed0"


def test_config_keys_are_validated() -> None:
    config = load_config(overrides={"evaluation": {"operating_point": {"sensitivity": 0.9}}})
    assert config.evaluation.operating_point == {"sensitivity": 0.9}
    assert config.evaluation.calibration == "platt"  # the default: 2 parameters
    for bad, words in (
        ({"operating_point": "youdon"}, "operating_point"),
        ({"operating_point": {"sensitivity": 1.5}}, "not a rate in (0, 1]"),
        ({"operating_point": {"ppv": 0.9}}, "unknown target 'ppv'"),
        ({"operating_point": {"sensitivity": 0.9, "specificity": 0.9}}, "one target rate"),
        ({"calibration": "beta"}, "evaluation.calibration"),
    ):
        with pytest.raises(ConfigError, match="evaluation") as err:
            load_config(overrides={"evaluation": bad})
        assert words in str(err.value), (bad, err.value)


def test_evaluate_writes_calibration_and_the_operating_point(split_run) -> None:
    _, run = split_run
    record = json.loads((run / "calibration.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    splits = [r for r in _rows(run / "splits.csv") if r["set"] == "weak"]
    val = [r for r in splits if r["split"] == "val"]
    events = sum(int(r["label"]) for r in val)
    assert record["fitted_on"] == {
        "patients": "the weak set's val split",
        "n": len(val),
        "events": events,
        "non_events": len(val) - events,
    }
    assert "too small to trust" in record["warning"]  # a few validation patients
    assert metrics["calibration"]["warning"] == record["warning"]
    # the test patients' probabilities are the map of the uncalibrated ones
    rows = _rows(run / "predictions_test.csv")
    y = np.array([int(r["label"]) for r in rows])
    raw = np.array([float(r["probability_uncalibrated"]) for r in rows])
    calibrated = np.array([float(r["probability"]) for r in rows])
    mapping = Recalibration.from_json(record)
    # (the file's 6 decimals of the raw score, through a steep map fitted on few patients)
    assert calibrated == pytest.approx(mapping(raw), abs=1e-3)
    # AUCs of the uncalibrated scores; Brier before/after by scikit-learn
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, raw))
    after = metrics["calibration"]["after"]
    assert metrics["calibration"]["before"]["brier"] == pytest.approx(
        brier_score_loss(y, raw), abs=1e-5
    )
    assert after["brier"] == pytest.approx(brier_score_loss(y, calibrated), abs=1e-5)
    # the operating point: chosen on the validation patients, read on the test patients
    point = metrics["operating_point"]
    threshold = record["operating_point"]["threshold"]
    assert point["threshold"] == metrics["threshold"] == threshold
    assert point["target"] == "youden" and point["chosen_on"] == "the weak set's val split"
    called = calibrated >= threshold
    tp, pos = int((called & (y == 1)).sum()), int(y.sum())
    tn, neg = int((~called & (y == 0)).sum()), int((y == 0).sum())
    assert (point["tp"], point["tn"]) == (tp, tn)
    assert point["sensitivity"] == metrics["sensitivity"] == pytest.approx(tp / pos)
    assert point["specificity_ci95"] == pytest.approx(list(wilson_interval(tn, neg)))
    section = (split_run[0] / "results.md").read_text()
    assert "## Calibration and operating point" in section and "too small to trust" in section


def test_predict_applies_the_runs_calibration_and_threshold(split_run, tiny_data, tmp_path) -> None:
    _, run = split_run
    record = json.loads((run / "calibration.json").read_text())
    image = tiny_data / "weak" / "images" / "W0001.nii.gz"
    (result,) = predict(run, [image], tmp_path / "pred")
    pred = json.loads((tmp_path / "pred" / "W0001" / "prediction.json").read_text())
    assert pred["probability"] == pytest.approx(
        float(Recalibration.from_json(record)(np.array([pred["probability_uncalibrated"]]))[0])
    )
    assert pred["probability_uncalibrated"] == pred["classifier_probability"]  # no readout
    assert pred["threshold"] == record["operating_point"]["threshold"]
    assert pred["label"] == int(pred["probability"] >= pred["threshold"])
    assert pred["operating_point"]["target"] == "youden"
    cal = pred["probability_calibration"]
    assert cal["method"] == record["method"] and cal["fitted_on"] == record["fitted_on"]
    assert "too small to trust" in cal["warning"]
    (row,) = _rows(tmp_path / "pred" / "summary.csv")
    assert float(row["threshold"]) == pytest.approx(pred["threshold"], abs=1e-6)
    # a run evaluated before calibration existed: raw probability, evaluation.threshold
    (run / "calibration.json").rename(tmp_path / "kept.json")
    try:
        (old,) = predict(run, [image], tmp_path / "old")
    finally:
        (tmp_path / "kept.json").rename(run / "calibration.json")
    assert old["probability"] == old["probability_uncalibrated"]
    assert old["threshold"] == 0.5 and old["label"] == int(old["probability"] >= 0.5)
    assert "no calibration.json" in old["probability_calibration"]["note"]


def test_calibration_does_not_move_the_auc(split_run, tiny_data) -> None:
    out, run = split_run
    before = json.loads((out / "results.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    try:
        for method in ("none", "isotonic"):
            config = tiny_config(
                run.parent.parent.parent.parent,
                training={"epochs": 1},
                evaluation={"calibration": method, "operating_point": {"sensitivity": 0.9}},
            )
            # only the evaluation settings changed: compare scores the run again
            after = compare(config, *manifests(tiny_data), out, ["supervised"], [0], False)
            assert after["strategies"]["supervised"]["test_auc"] == pytest.approx(
                before["strategies"]["supervised"]["test_auc"], abs=1e-12
            )
            assert after["strategies"]["supervised"]["test_auc_ci95"] == pytest.approx(
                before["strategies"]["supervised"]["test_auc_ci95"], abs=1e-12
            )
            record = json.loads((run / "calibration.json").read_text())
            assert record["requested"] == method
            assert record["operating_point"]["target"] == "sensitivity"
            assert record["operating_point"]["sensitivity"] >= 0.9
            if method == "none":
                rows = _rows(run / "predictions_test.csv")
                assert all(r["probability"] == r["probability_uncalibrated"] for r in rows)
    finally:
        (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        evaluate_run(run, detection=False)


def test_compare_cv_cross_fits_the_calibration(tiny_data, tmp_path) -> None:
    config = tiny_config(tmp_path, training={"epochs": 1})
    out = tmp_path / "cv"
    results = compare(
        config, *manifests(tiny_data), out, ["supervised"], [0], False, cv=2, repeats=1
    )
    entry = results["calibration"]["supervised"]
    run = entry["runs"]["r0s0"]
    assert entry["method"] == "platt" and run["n"] == results["n_test"]
    rows = [r for r in _rows(out / "test_predictions.csv") if r["strategy"] == "supervised"]
    y = np.array([int(r["label"]) for r in rows])
    raw = np.array([float(r["probability"]) for r in rows])
    calibrated = np.array([float(r["probability_calibrated"]) for r in rows])
    # each fold through the map fitted on the other fold's out-of-fold predictions
    fold_of = {}
    for f in (0, 1):
        split = _rows(out / "cv/repeat0" / f"fold{f}" / "supervised/seed0/splits.csv")
        fold_of |= {
            r["patient_id"]: f for r in split if r["set"] == "weak" and r["split"] == "test"
        }
    groups = np.array([fold_of[r["patient_id"]] for r in rows])
    for f in (0, 1):
        own = fit_recalibration("platt", y[groups != f], raw[groups != f])
        assert calibrated[groups == f] == pytest.approx(own(raw[groups == f]), abs=2e-6)
    assert run["before"]["brier"] == pytest.approx(brier_score_loss(y, raw), abs=1e-5)
    assert run["after"]["brier"] == pytest.approx(brier_score_loss(y, calibrated), abs=1e-5)
    # the AUC column is that of the uncalibrated out-of-fold scores
    assert results["strategies"]["supervised"]["test_auc"][0] == pytest.approx(
        roc_auc_score(y, raw)
    )
    # one map on all out-of-fold predictions, for later use
    kept = json.loads((out / "calibration" / "supervised.json").read_text())
    assert kept["fitted_on"]["n"] == len(rows)
    assert kept["params"] == pytest.approx(fit_recalibration("platt", y, raw).params, rel=1e-6)
    assert "per fold" in (out / "results.md").read_text()
    # the benchmark script's table
    spec = importlib.util.spec_from_file_location(
        "calibration_cv", Path(__file__).parents[1] / "benchmarks" / "calibration_cv.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main([str(out)])
    assert "| Supervised Baseline |" in text and "→" in text


def test_report_shows_the_calibration_section(split_run) -> None:
    from lymphdx.workflows.report import write_report

    out, run = split_run
    for folder in (out, run):
        page = write_report(folder).read_text()
        assert "Calibration and operating point" in page and "too small to trust" in page


def test_youden_without_separation_keeps_the_configured_threshold() -> None:
    """Calibration patients whose scores do no better than chance (Youden's J ≤ 0 at every
    cut): no cut above every probability (all negative); evaluation.threshold, said."""
    from lymphdx.workflows.calibrate import _threshold

    config = load_config(preset="quick")
    y = np.array([1, 0, 1, 0, 1, 0])
    q = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7])  # every positive below its negative
    op = _threshold(config, y, q)
    assert op["threshold"] == config.evaluation.threshold == 0.5
    assert op["sensitivity"] == pytest.approx(1 / 3) and op["specificity"] == pytest.approx(1 / 3)
    assert "better than chance" in op["note"]
    separated = _threshold(config, y, np.array([0.8, 0.1, 0.7, 0.2, 0.9, 0.3]))
    assert separated["note"] is None and separated["threshold"] == pytest.approx(0.7)
    assert separated["sensitivity"] == 1.0 and separated["specificity"] == 1.0
