"""Fold ensembles (``workflows.ensemble``, ``workflows.ensemble_evaluate``): the ensemble's
probability and ROI map are the means of what ``predict`` gives per member, its
``prediction.json``, its members resolved from a compare folder, the members refused, and
``ensemble_metrics.json`` against sklearn and DeLong written out by hand."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from sklearn.metrics import roc_auc_score

from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.data.synthetic import SynthSpec, write_synthetic
from lymphdx.stats.calibration import Recalibration
from lymphdx.stats.metrics import delong_paired, paired_bootstrap_delta_ci
from lymphdx.workflows.compare import compare
from lymphdx.workflows.ensemble import check_members, predict_ensemble, resolve_members
from lymphdx.workflows.ensemble_evaluate import evaluate_ensemble
from lymphdx.workflows.predict import predict
from tests.conftest import tiny_config
from tests.helpers import cli, manifests, one_error, one_thread  # noqa: F401 (autouse)
from tests.test_metrics import _brute_auc, _brute_delong_cov

STRATEGY = "supervised"


@pytest.fixture(scope="module")
def cv(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A 2-fold ``compare --cv`` of one strategy (one epoch) and its two fold runs."""
    tmp = tmp_path_factory.mktemp("ensemble_cv")
    config = tiny_config(tmp, training={"epochs": 1})
    out = tmp / "cmp"
    compare(config, *manifests(tiny_data), out, [STRATEGY], [0], False, cv=2, repeats=1)
    return out, [out / "cv/repeat0" / f"fold{f}" / STRATEGY / "seed0" for f in (0, 1)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another seed's patients (ids W0001... again, other scans): the weak manifest."""
    out = tmp_path_factory.mktemp("fresh")
    write_synthetic(out, SynthSpec(n_weak=8, n_pos=4, n_strong=0, seed=11))
    return out / "weak" / "manifest.csv"


def _images(manifest: Path) -> list[Path]:
    with open(manifest, newline="") as f:
        return [manifest.parent / r["image"] for r in csv.DictReader(f)]


def _map(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_ensemble_is_the_mean_of_the_members_predictions(cv, fresh, tmp_path) -> None:
    compare_out, runs = cv
    images = _images(fresh)[:2]
    alone = [predict(run, images, tmp_path / f"member{i}") for i, run in enumerate(runs)]
    results = predict_ensemble([compare_out], images, tmp_path / "ens", strategy=STRATEGY)
    kept = json.loads((compare_out / "calibration" / f"{STRATEGY}.json").read_text())
    for j, (image, result) in enumerate(zip(images, results, strict=True)):
        name = image.name.removesuffix(".nii.gz")
        raw = [a[j]["probability_uncalibrated"] for a in alone]
        assert result["probability_uncalibrated"] == pytest.approx(np.mean(raw), abs=1e-9)
        # the compare's map of the pooled out-of-fold predictions and its operating point
        expected = Recalibration.from_json(kept)(np.array([np.mean(raw)]))[0]
        assert result["probability"] == pytest.approx(expected, abs=1e-9)
        assert result["threshold"] == kept["operating_point"]["threshold"]
        assert result["label"] == int(result["probability"] >= result["threshold"])
        # the ROI map: the members' maps on the scan's own grid, averaged
        maps = [_map(tmp_path / f"member{i}" / name / "roi_prob.nii.gz") for i in (0, 1)]
        ours = _map(tmp_path / "ens" / name / "roi_prob.nii.gz")
        assert ours.shape == maps[0].shape
        np.testing.assert_allclose(ours, np.mean(maps, axis=0), atol=1e-5)
        mask = _map(tmp_path / "ens" / name / "roi_mask.nii.gz")
        np.testing.assert_array_equal(mask, ours > result["roi_threshold"])
        # prediction.json lists the members with their own probabilities and weights
        written = json.loads((tmp_path / "ens" / name / "prediction.json").read_text())
        ensemble = written["ensemble"]
        assert ensemble["n"] == 2 and "mean" in ensemble["averaged"]
        assert ensemble["source"] == {
            "compare": str(compare_out.resolve()),
            "strategy": STRATEGY,
            "cross_validation": True,
        }
        for i, member in enumerate(ensemble["members"]):
            assert member["run"] == str(runs[i].resolve())
            best = (runs[i] / "checkpoints" / "best.pt").read_bytes()
            assert member["checkpoint"]["sha256"] == hashlib.sha256(best).hexdigest()
            assert member["probability_uncalibrated"] == pytest.approx(raw[i], abs=1e-9)
            assert member["probability"] == pytest.approx(alone[i][j]["probability"], abs=1e-9)
        assert written["probability_calibration"]["method"] == kept["method"]
    assert (tmp_path / "ens" / "summary.csv").is_file()


def test_runs_outside_one_cv_stay_uncalibrated(cv, fresh, tmp_path) -> None:
    """Runs that are not every run of one compare --cv strategy: the mean is labelled at
    evaluation.threshold, with a note."""
    _, runs = cv
    copy = tmp_path / "elsewhere"
    shutil.copytree(runs[1], copy)
    image = _images(fresh)[:1]
    alone = [predict(run, image, tmp_path / f"m{i}")[0] for i, run in enumerate([runs[0], copy])]
    (result,) = predict_ensemble([runs[0], copy], image, tmp_path / "ens")
    mean = np.mean([a["probability_uncalibrated"] for a in alone])
    assert result["probability"] == pytest.approx(mean, abs=1e-9)
    assert result["threshold"] == tiny_config(tmp_path).evaluation.threshold
    assert result["probability_calibration"]["method"] == "none"
    assert "uncalibrated" in result["probability_calibration"]["note"]
    assert result["ensemble"]["source"] is None


def test_members_resolved_from_a_compare_folder(cv, tmp_path) -> None:
    compare_out, runs = cv
    members = resolve_members([compare_out], STRATEGY)
    assert members.runs == [r.resolve() for r in runs] and members.cv
    # the same runs given one by one, in another order, are recognised as the compare's
    again = resolve_members(list(reversed(runs)))
    assert again.runs == members.runs and again.compare == compare_out.resolve()
    assert not resolve_members([runs[0], shutil.copytree(runs[1], tmp_path / "c")]).cv
    for models, strategy, words in (
        ([compare_out], None, "--strategy"),
        ([compare_out], "ssmdmt", f"holds {STRATEGY}"),
        ([runs[0]], None, "at least two runs"),
        ([runs[0], runs[0]], None, "given twice"),
        ([runs[0], runs[1]], STRATEGY, "one compare folder"),
    ):
        with pytest.raises(LymphdxError, match=words):
            resolve_members(models, strategy)


def test_incompatible_or_unfinished_members_are_refused(cv, tmp_path) -> None:
    _, runs = cv

    def copy_with(name: str, section: str, key: str, value: object) -> Path:
        run = shutil.copytree(runs[1], tmp_path / name)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config[section][key] = value
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return run

    other_zeta = copy_with("zeta", "propagation", "roi_threshold", 0.6)
    with pytest.raises(LymphdxError, match="roi_threshold") as err:
        check_members([runs[0], other_zeta])
    assert str(runs[0]) in str(err.value) and str(other_zeta) in str(err.value)
    unfinished = copy_with("short", "training", "epochs", 3)
    with pytest.raises(LymphdxError, match="unfinished: it stopped after 1 of 3 epochs"):
        check_members([runs[0], unfinished])
    no_weights = shutil.copytree(runs[1], tmp_path / "gone")
    (no_weights / "checkpoints" / "best.pt").unlink()
    with pytest.raises(LymphdxError, match="best.pt"):
        check_members([runs[0], no_weights])


def test_ensemble_metrics_against_an_independent_computation(cv, fresh, tmp_path) -> None:
    compare_out, runs = cv
    metrics = evaluate_ensemble([compare_out], fresh, STRATEGY)
    folder = compare_out / "ensemble" / STRATEGY
    assert json.loads((folder / "ensemble_metrics.json").read_text())["auc"] == metrics["auc"]
    with open(folder / "ensemble_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["label"]) for r in rows])
    each = np.array([[float(r[f"member{k}"]) for r in rows] for k in (1, 2)])
    mean = np.array([float(r["probability_uncalibrated"]) for r in rows])
    np.testing.assert_allclose(mean, each.mean(axis=0), atol=2e-6)
    # the members' scores are those predict gives each run alone
    alone = predict(runs[0], _images(fresh)[:2], tmp_path / "alone")
    assert each[0, :2] == pytest.approx([a["probability_uncalibrated"] for a in alone], abs=2e-6)
    assert metrics["n"] == 8 and metrics["n_pos"] == 4
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, mean), abs=1e-5)
    member_auc = [roc_auc_score(y, m) for m in each]
    assert metrics["members_auc"] == pytest.approx(member_auc, abs=1e-5)
    assert metrics["members_auc_mean"] == pytest.approx(np.mean(member_auc), abs=1e-5)
    # ensemble - mean of members: DeLong's contrast with the covariance written as loops
    vs = metrics["vs_members_mean"]
    c = np.array([1.0, -0.5, -0.5])
    scores = [mean, each[0], each[1]]
    cov = _brute_delong_cov(y, scores)
    delta = _brute_auc(y, mean) - np.mean([_brute_auc(y, m) for m in each])
    assert vs["delta_auc"] == pytest.approx(delta, abs=1e-5)
    assert vs["se_delong"] == pytest.approx(np.sqrt(c @ cov @ c), abs=1e-5)
    lo, hi = paired_bootstrap_delta_ci(y, mean, each, 200, 0.95, 0)  # the tiny config's
    assert vs["delta_ci95_bootstrap"] == pytest.approx([lo, hi], abs=1e-5)
    for k, test in enumerate(metrics["vs_each_member"]):
        assert test["p"] == pytest.approx(delong_paired(y, mean, each[k]).p, abs=1e-5)
    calibrated = np.array([float(r["probability"]) for r in rows])
    threshold = metrics["threshold"]
    assert metrics["operating_point"]["tp"] == int(((calibrated >= threshold) & (y == 1)).sum())
    # the fresh seed's ids are the training data's, its scans are not: noted, not refused
    assert any("scans differ" in n for n in metrics["unseen_check"]["notes"])


def test_patients_a_member_trained_on_are_refused(cv, tiny_data, tmp_path) -> None:
    compare_out, _ = cv
    weak, _ = manifests(tiny_data)
    with pytest.raises(InputError, match="trained or selected on") as err:
        evaluate_ensemble([compare_out], weak, STRATEGY, tmp_path / "out")
    assert "weak patient 'W0" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_command_line(cv, fresh, tmp_path) -> None:
    compare_out, runs = cv
    image = _images(fresh)[0]
    code, output = cli(
        "predict", "--model", compare_out, "--strategy", STRATEGY, "--out", tmp_path / "p", image
    )
    assert code == 0, output
    written = json.loads((tmp_path / "p" / "W0001" / "prediction.json").read_text())
    assert written["ensemble"]["n"] == 2
    code, output = cli(
        "predict", "--model", runs[0], "--model", runs[1], "--out", tmp_path / "q", image
    )
    assert code == 0, output
    code, output = cli("evaluate", *runs, "--weak", fresh, "--out", tmp_path / "e")
    assert code == 0, output
    assert json.loads((tmp_path / "e" / "ensemble_metrics.json").read_text())["n"] == 8
    one_error(*cli("predict", "--model", compare_out, "--out", tmp_path / "r", image), "--strategy")
    one_error(*cli("evaluate", runs[0], "--out", tmp_path / "s"), "--weak")
    one_error(*cli("evaluate", runs[0], "--weak", fresh), "at least two runs")
    # runs outside one compare: the metrics need a folder
    copy = shutil.copytree(runs[1], tmp_path / "copy")
    one_error(*cli("evaluate", runs[0], copy, "--weak", fresh), "--out")
