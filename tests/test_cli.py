"""The command line as the README documents it: commands, output files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from lymphdx.cli import app
from tests.conftest import tiny_config

runner = CliRunner()


def _config_file(tmp_path: Path) -> Path:
    cfg = tiny_config(tmp_path, training={"epochs": 1})
    data = cfg.model_dump(mode="json")
    data.pop("manifests")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_evaluate_predict_compare_commands(tiny_data: Path, tmp_path: Path) -> None:
    weak, strong = tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"
    config = _config_file(tmp_path)
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--weak",
            str(weak),
            "--strong",
            str(strong),
            "--strategy",
            "multitask",
            "--out",
            str(run),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["strategy"] == "multitask" and saved["manifests"]["weak"] == str(weak.resolve())

    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"split", "n", "n_pos", "auc", "auc_ci95"} <= set(metrics)

    image = tiny_data / "weak" / "images" / "W0002.nii.gz"
    result = runner.invoke(
        app, ["predict", "--model", str(run), str(image), "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    for name in ("prediction.json", "roi_prob.nii.gz", "roi_mask.nii.gz", "overlay.png"):
        assert (tmp_path / "p" / "W0002" / name).exists(), name

    out = tmp_path / "cmp"
    result = runner.invoke(
        app,
        [
            "compare",
            "--weak",
            str(weak),
            "--strong",
            str(strong),
            "--out",
            str(out),
            "--strategies",
            "supervised",
            "--strategies",
            "ssmdmt",
            "--seeds",
            "2",
            "--config",
            str(config),
            "--effect",
            "0.1",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    # --effect: the design analysis at a declared gain of 0.1, stated in the table
    assert results["claim_rule"]["declared_effect"] == 0.1
    design = results["paired_tests"]["ssmdmt vs supervised"]["design"]
    assert design["effect"] == 0.1 and "a true gain of 0.10 in AUC" in design["text"]
    assert "power at ΔAUC +0.1 |" in (out / "results.md").read_text()
    for name in ("supervised", "ssmdmt"):
        r = results["strategies"][name]
        assert len(r["test_auc"]) == 2
        assert abs(r["test_auc_mean"] - sum(r["test_auc"]) / 2) < 1e-12
        assert r["test_auc_ci95"][0] <= r["test_auc_ci95"][1]
    assert "ssmdmt vs supervised" in results["paired_tests"]
    table = (out / "results.md").read_text()
    assert "Semi-Supervised Multi-domain Multi-Task" in table and "Supervised Baseline" in table
    # the tiny data's test split holds a handful of patients: the table says so
    assert results["n_test"] < 10 and "too small to mean anything" in table
    # a run whose ROI decoder found nothing says so in metrics.json and results.md
    ssmdmt_runs = sorted((out / "runs" / "ssmdmt").glob("seed*"))
    assert len(ssmdmt_runs) == 2
    unlearned = []
    for run in ssmdmt_runs:
        status = json.loads((run / "metrics.json").read_text())["roi_decoder"]
        # read on all strong training + validation scans at the end (roi_status.json)
        assert status == json.loads((run / "roi_status.json").read_text())
        assert status["read_on"] == "strong training + validation scans"
        assert status["learned"] == (status["dice"] >= 0.05)
        # results.md says per run which switches fired, on how many scans
        assert f"| {run.name} | " in table and f"on {status['n_scans']} strong training" in table
        if not status["learned"]:
            unlearned.append(str(run))
            log = (run / "train.log").read_text()
            assert "the ROI decoder found no node: Dice" in log
    assert results["strategies"]["ssmdmt"].get("roi_not_learned", []) == unlearned
    assert ("the ROI decoder found no node" in table) == bool(unlearned)
    assert "roi_decoder" not in json.loads(
        (out / "runs" / "supervised" / "seed0" / "metrics.json").read_text()
    )
    assert (out / "roc.png").exists()
    # compare is resumable: a second call reuses the finished runs
    again = runner.invoke(
        app,
        [
            "compare",
            "--weak",
            str(weak),
            "--strong",
            str(strong),
            "--out",
            str(out),
            "--strategies",
            "supervised",
            "--strategies",
            "ssmdmt",
            "--seeds",
            "2",
            "--config",
            str(config),
        ],
    )
    assert again.exit_code == 0
    # ... and without --effect the same runs are read again (evaluation.declared_effect
    # scores nothing): the same figures, the design analysis at the default 0.05
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["claim_rule"].pop("declared_effect") == 0.05
    assert results["claim_rule"].pop("declared_effect") == 0.1
    assert {t.pop("design")["effect"] for t in rerun["paired_tests"].values()} == {0.05}
    assert {t.pop("design")["effect"] for t in results["paired_tests"].values()} == {0.1}
    assert rerun == results
    assert "scored again" not in again.output


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "weak.csv"
    bad.write_text("patient_id,image\nP1,a.nii.gz\n")
    strong = tmp_path / "strong.csv"
    strong.write_text("patient_id,image,mask\n")
    result = runner.invoke(
        app, ["train", "--weak", str(bad), "--strong", str(strong), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "label" in result.output and "weak.csv" in result.output
    assert "Traceback" not in result.output

    unknown = tmp_path / "c.yaml"
    unknown.write_text("training:\n  epoch: 3\n")
    result = runner.invoke(
        app,
        [
            "train",
            "--weak",
            str(bad),
            "--strong",
            str(strong),
            "--out",
            str(tmp_path / "r"),
            "--config",
            str(unknown),
        ],
    )
    assert result.exit_code == 2 and "training.epoch" in result.output


def test_synth_command_writes_manifests(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["synth", "--out", str(tmp_path / "d"), "--n-weak", "4", "--n-pos", "2", "--n-strong", "2"],
    )
    assert result.exit_code == 0, result.output
    assert (
        (tmp_path / "d" / "weak" / "manifest.csv").read_text().startswith("patient_id,image,label")
    )
    assert (
        (tmp_path / "d" / "strong" / "manifest.csv").read_text().startswith("patient_id,image,mask")
    )


def test_compare_cross_validation_pools_out_of_fold_predictions(
    tiny_data: Path, tmp_path: Path
) -> None:
    from lymphdx.data.manifest import load_weak_manifest
    from lymphdx.workflows.folds import cv_assignments

    weak_csv, strong = tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"
    weak = load_weak_manifest(weak_csv)
    folds = cv_assignments(weak, 3, 2, seed=0, val_fraction=0.1)
    assert len(folds) == 6
    for r in range(2):
        tests = [{p for p, s in a.items() if s == "test"} for rr, _, a in folds if rr == r]
        assert set().union(*tests) == {w.patient_id for w in weak}  # every patient tested once
        assert sum(len(t) for t in tests) == len(weak)
        for _, _, a in (x for x in folds if x[0] == r):
            labels = {w.label for w in weak if a[w.patient_id] == "val"}
            assert labels == {0, 1}  # model selection needs both classes
    assert folds == cv_assignments(weak, 3, 2, seed=0, val_fraction=0.1)  # same folds for all

    out = tmp_path / "cv"
    result = runner.invoke(
        app,
        [
            "compare",
            "--weak",
            str(weak_csv),
            "--strong",
            str(strong),
            "--out",
            str(out),
            "--strategies",
            "supervised",
            "--strategies",
            "multitask",
            "--cv",
            "3",
            "--repeats",
            "1",
            "--config",
            str(_config_file(tmp_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "cv" and results["n_test"] == len(weak)
    for name in ("supervised", "multitask"):
        r = results["strategies"][name]
        assert len(r["fold_auc"]) == 3 and len(r["test_auc"]) == 1
    # the pooled AUC is the AUC of the pooled out-of-fold predictions
    import csv as _csv

    from lymphdx.stats.metrics import auc

    with open(out / "test_predictions.csv") as f:
        rows = [r for r in _csv.DictReader(f) if r["strategy"] == "supervised"]
    assert len(rows) == len(weak)
    y = [int(r["label"]) for r in rows]
    p = [float(r["probability"]) for r in rows]
    assert abs(results["strategies"]["supervised"]["test_auc"][0] - auc(y, p)) < 1e-12
    assert "multitask vs supervised" in results["paired_tests"]
    assert "cross-validation" in (out / "results.md").read_text()
    # detection is summarised over the folds of the strategy that trains the decoder
    detection = results["strategies"]["multitask"]["detection"]
    assert len(detection["strong_test_dice"]) == 3
    assert "detection" not in results["strategies"]["supervised"]
