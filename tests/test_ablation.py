"""``compare --ablation`` (issue 8): the development-only cross-validation, the post-hoc
selection arms, pooled-validation selection and the recommendation rule."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.config import validate
from lymphdx.core.domains import WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.engine.propagation import predict_volumes
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model, load_run_config
from lymphdx.engine.selection import pooled_best_epoch
from lymphdx.workflows.ablation import (
    ARMS,
    REFERENCE,
    ablation,
    recommend,
    recommended_yaml,
)
from lymphdx.workflows.compare import add_claims
from lymphdx.workflows.evaluate import read_predictions
from tests.conftest import tiny_config

runner = CliRunner()


def _rows(epoch: int, pairs: list[tuple[int, float]], prefix: str) -> list[dict[str, str]]:
    return [
        {"epoch": str(epoch), "patient_id": f"{prefix}{i}", "label": str(y), "probability": str(p)}
        for i, (y, p) in enumerate(pairs)
    ]


def test_pooled_best_epoch_hand_worked() -> None:
    # two folds, two validation patients each (one of each class)
    # epoch 0: fold A ranks right, fold B wrong; pooled scores 0.9(+) 0.2(-) 0.3(+) 0.4(-)
    #   pairs (+ over -): 0.9>0.2 0.9>0.4 0.3>0.2 0.3<0.4 -> 3/4
    # epoch 1: pooled 0.6(+) 0.5(-) 0.7(+) 0.1(-): all 4 pairs right -> 1.0
    # epoch 2 exists in fold A only: it does not count
    a = _rows(0, [(1, 0.9), (0, 0.2)], "a") + _rows(1, [(1, 0.6), (0, 0.5)], "a")
    a += _rows(2, [(1, 0.99), (0, 0.01)], "a")
    b = _rows(0, [(1, 0.3), (0, 0.4)], "b") + _rows(1, [(1, 0.7), (0, 0.1)], "b")
    epoch, scores = pooled_best_epoch([a, b])
    assert epoch == 1
    assert scores == pytest.approx({0: 0.75, 1: 1.0})


def test_pooled_best_epoch_ties_go_to_lower_cross_entropy() -> None:
    # both epochs rank perfectly (AUC 1); epoch 1 is the more confident, lower BCE
    a = _rows(0, [(1, 0.55), (0, 0.45)], "a") + _rows(1, [(1, 0.9), (0, 0.1)], "a")
    b = _rows(0, [(1, 0.6), (0, 0.4)], "b") + _rows(1, [(1, 0.8), (0, 0.2)], "b")
    assert pooled_best_epoch([a, b])[0] == 1
    with pytest.raises(ValueError, match="every fold"):
        pooled_best_epoch([a, []])


def _result(deltas: dict[str, tuple[float, float, float]]) -> dict:
    """A results dict with ``arm -> (ΔAUC mean, ΔAUC of the averaged scores, p)``, an
    interval ±0.01 around the mean ΔAUC, and the claim rule over the arms (Holm)."""
    results = {
        "paired_tests": {
            f"{arm} vs {REFERENCE}": {
                "delta_auc": d,
                "delta_ci95": [d - 0.01, d + 0.01],
                "delta_auc_seed_averaged_scores": pooled,
                "p_delong": p,
            }
            for arm, (d, pooled, p) in deltas.items()
        }
    }
    add_claims(results, 0.95, 0.05)
    return results


def test_recommended_yaml_is_a_config_of_the_adopted_options() -> None:
    rec = recommend(_result({"graph-lp": (0.05, 0.04, 0.01), "swa": (0.03, 0.03, 0.3)}))
    text = recommended_yaml(rec)
    assert "# adopted (ΔAUC vs ssmdmt > 0): graph-lp, swa" in text
    assert "supporting a claim (Holm-adjusted p, CI excludes 0): graph-lp" in text
    config = validate(yaml.safe_load(text))
    assert config.strategy == "ssmdmt"
    assert config.propagation.method == "graph"
    assert config.training.selection == "swa"
    assert config.propagation.teacher == "student"  # not adopted: the default stays
    empty = yaml.safe_load(recommended_yaml(recommend(_result({"dsbn": (-0.1, -0.1, 0.5)}))))
    assert empty == {"strategy": "ssmdmt"}


def test_recommend_rule() -> None:
    rec = recommend(
        _result(
            {
                "graph-lp": (0.05, 0.04, 0.001),  # adopted, supports a claim (Holm 0.007)
                "dsbn": (0.02, -0.01, 0.6),  # mean up, pooled down: not adopted
                "roi-gate": (-0.03, -0.02, 0.4),  # worse: not adopted
                "ema-teacher": (0.01, 0.02, 0.7),  # selection rule, beaten by swa
                "swa": (0.03, 0.03, 0.3),  # the best selection rule
                "last": (0.02, 0.01, 0.5),  # selection rule, beaten by swa
                "pooled-val": (0.2, 0.2, 0.001),  # a CV procedure: never a run option
            }
        )
    )
    assert rec["adopted"] == ["graph-lp", "swa", "ema-teacher (teacher only)"]
    assert rec["supports_claim"] == ["graph-lp"]
    assert rec["config"] == {
        "propagation": {"method": "graph", "teacher": "ema"},
        "training": {"selection": "swa"},
    }
    nothing = recommend(_result({"graph-lp": (-0.01, -0.01, 0.9)}))
    assert nothing == {"adopted": [], "supports_claim": [], "config": {}}
    last = recommend(_result({"last": (0.01, 0.01, 0.8)}))
    assert last["config"] == {"training": {"selection": "last"}}


def _tiny_ablation(data: Path, out: Path) -> dict:
    """ssmdmt, roi-gate, last and pooled-val: 2-fold CV, one repeat, seed 0."""
    return ablation(
        tiny_config(out.parent),
        data / "weak" / "manifest.csv",
        data / "strong" / "manifest.csv",
        out,
        ["roi-gate", "last", "pooled-val"],
        [0],
        k=2,
        repeats=1,
        progress=False,
    )


@pytest.fixture(scope="module")
def ablated(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ablation") / "abl"
    return out, _tiny_ablation(tiny_data, out)


def _split_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ablation_never_loads_the_held_out_test_patients(ablated: tuple[Path, dict]) -> None:
    out, results = ablated
    fixed = _split_rows(out / "splits.csv")
    held_out = {r["patient_id"] for r in fixed if r["set"] == "weak" and r["split"] == "test"}
    development = {r["patient_id"] for r in fixed if r["set"] == "weak"} - held_out
    assert held_out and development
    assert {r["patient_id"] for r in _split_rows(out / "development_weak.csv")} == development
    assert results["n_test"] == len(development)
    assert results["n_held_out_test"] == len(held_out)
    run_splits = list((out / "cv").rglob("splits.csv"))
    assert len(run_splits) == 2 * 2  # two folds × (ssmdmt, roi-gate)
    for path in run_splits:
        weak_ids = {r["patient_id"] for r in _split_rows(path) if r["set"] == "weak"}
        assert weak_ids == development
    # out-of-fold: each development patient is scored once per repeat, by every arm
    for arm in (REFERENCE, "roi-gate"):
        scored = []
        for fold in (0, 1):
            scored += list(
                read_predictions(
                    out / "cv/repeat0" / f"fold{fold}" / arm / "seed0/predictions_test.csv"
                )
            )
        assert sorted(scored) == sorted(development)


def test_ablation_arms_are_ssmdmt_plus_one_option(ablated: tuple[Path, dict]) -> None:
    out, results = ablated
    reference = load_run_config(out / "cv/repeat0/fold0/ssmdmt/seed0")
    gated = load_run_config(out / "cv/repeat0/fold0/roi-gate/seed0")
    assert reference.strategy == gated.strategy == "ssmdmt"
    assert reference.propagation.roi_cls_gate is None
    assert gated.propagation.roi_cls_gate == 0.5
    assert reference.training.keep_epochs
    assert set(results["strategies"]) == {REFERENCE, "roi-gate", "last", "pooled-val"}
    assert set(results["paired_tests"]) == {
        f"{a} vs {REFERENCE}" for a in ("roi-gate", "last", "pooled-val")
    }
    assert results["arms"]["roi-gate"] == ARMS["roi-gate"][0]
    # the arms are one family: Holm over their three raw p-values
    tests = list(results["paired_tests"].values())
    raw = sorted(t["p_delong"] for t in tests)
    by_hand = np.minimum(np.maximum.accumulate([3 * raw[0], 2 * raw[1], raw[2]]), 1.0)
    assert sorted(t["p_holm"] for t in tests) == pytest.approx(by_hand)
    assert results["claim_rule"]["family_size"] == 3
    text = (out / "ablation.md").read_text()
    for arm in ("roi-gate", "last", "pooled-val"):
        assert f"| {arm} |" in text
    # a config lymphdx train --config accepts: the ablation's settings, as ssmdmt with
    # the adopted options
    recommended = validate(yaml.safe_load((out / "recommended.yaml").read_text()))
    assert recommended.strategy == "ssmdmt"
    assert recommended.data.shape == reference.data.shape == (32, 32, 16)
    adopted = results["recommended"]["config"]
    for section, values in adopted.items():
        for key, value in values.items():
            assert getattr(getattr(recommended, section), key) == value
    assert recommended.propagation.warmup_epochs == reference.propagation.warmup_epochs == 1


def test_last_arm_scores_the_final_weights(ablated: tuple[Path, dict]) -> None:
    out, _ = ablated
    run = out / "cv/repeat0/fold1/ssmdmt/seed0"
    config, model, _ = load_model(run, "last")  # the trainer's own final state
    volumes = load_run_data(config, run, need_strong=False).volumes("weak", "test")
    with torch.no_grad():
        expected = predict_volumes(model, volumes, domain=WEAK, tta=config.evaluation.tta_flip)
    got = read_predictions(run / f"predictions_test@epoch_{config.training.epochs - 1:03d}.csv")
    assert list(got) == list(volumes.patient_ids)
    np.testing.assert_allclose([got[p][1] for p in volumes.patient_ids], expected, atol=1e-6)


def test_pooled_val_arm_uses_the_epoch_of_best_pooled_validation_auc(
    ablated: tuple[Path, dict],
) -> None:
    out, results = ablated
    rows = []
    for fold in (0, 1):
        rows += _split_rows(out / "cv/repeat0" / f"fold{fold}" / "ssmdmt/seed0/val_predictions.csv")
    by_epoch = {}
    for e in sorted({int(r["epoch"]) for r in rows}):
        sel = [r for r in rows if int(r["epoch"]) == e]
        by_epoch[e] = roc_auc_score(
            [int(r["label"]) for r in sel], [float(r["probability"]) for r in sel]
        )
    chosen = results["pooled_val_choices"]["r0s0"]
    assert chosen["pooled_val_auc"] == pytest.approx(max(by_epoch.values()))
    assert by_epoch[chosen["epoch"]] == pytest.approx(max(by_epoch.values()))
    pooled, fold_auc = {}, []
    for fold in (0, 1):
        run = out / "cv/repeat0" / f"fold{fold}" / "ssmdmt/seed0"
        rows = read_predictions(run / f"predictions_test@epoch_{chosen['epoch']:03d}.csv")
        pooled |= rows
        fold_auc.append(roc_auc_score([v[0] for v in rows.values()], [v[1] for v in rows.values()]))
    assert results["strategies"]["pooled-val"]["fold_auc"] == pytest.approx(fold_auc)
    auc = results["strategies"]["pooled-val"]["test_auc"][0]
    ids = sorted(pooled)
    assert auc == pytest.approx(
        roc_auc_score([pooled[p][0] for p in ids], [pooled[p][1] for p in ids])
    )


def test_ablation_resumes_without_training(ablated: tuple[Path, dict], tiny_data: Path) -> None:
    out, results = ablated
    metrics = sorted((out / "cv").rglob("metrics.json"))
    before = [p.stat().st_mtime_ns for p in metrics]
    again = _tiny_ablation(tiny_data, out)
    assert [p.stat().st_mtime_ns for p in metrics] == before
    for arm, r in results["strategies"].items():
        assert again["strategies"][arm]["test_auc"] == r["test_auc"]


def test_ablation_refuses_unknown_arms_and_arms_without_ablation(
    tiny_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(LymphdxError, match="unknown ablation arm.*'nope'|nope"):
        ablation(
            tiny_config(tmp_path),
            tiny_data / "weak" / "manifest.csv",
            tiny_data / "strong" / "manifest.csv",
            tmp_path / "x",
            ["nope"],
        )
    result = runner.invoke(
        app,
        [
            "compare",
            "--weak",
            str(tiny_data / "weak" / "manifest.csv"),
            "--strong",
            str(tiny_data / "strong" / "manifest.csv"),
            "--out",
            str(tmp_path / "y"),
            "--arms",
            "dsbn",
        ],
    )
    assert result.exit_code != 0
    assert "--arms needs --ablation" in result.output


def test_compare_cv_pooled_selection(tiny_data: Path, tmp_path: Path) -> None:
    from lymphdx.workflows.compare import compare
    from lymphdx.workflows.report import write_report

    weak, strong = tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"
    config = tiny_config(tmp_path)
    with pytest.raises(LymphdxError, match="needs --cv"):
        compare(config, weak, strong, tmp_path / "s", ["supervised"], [0], False, 0, 1, True)
    out = tmp_path / "cv"
    results = compare(
        config,
        weak,
        strong,
        out,
        ["supervised"],
        [0],
        False,
        cv=2,
        repeats=1,
        pooled_selection=True,
    )
    assert list(results["strategies"]) == ["supervised", "supervised@pooled-val"]
    epoch = results["pooled_val_choices"]["supervised"]["r0s0"]["epoch"]
    pooled = {}
    for fold in (0, 1):
        run = out / "cv/repeat0" / f"fold{fold}" / "supervised/seed0"
        assert load_run_config(run).training.keep_epochs
        pooled |= read_predictions(run / f"predictions_test@epoch_{epoch:03d}.csv")
    ids = sorted(pooled)
    assert results["strategies"]["supervised@pooled-val"]["test_auc"][0] == pytest.approx(
        roc_auc_score([pooled[p][0] for p in ids], [pooled[p][1] for p in ids])
    )
    assert "supervised@pooled-val vs supervised" in results["paired_tests"]
    table = (out / "results.md").read_text()
    assert "| Supervised Baseline (pooled-val selection) | weak |" in table
    assert "pooled-val selection" in write_report(out).read_text()
    # an old folder trained without every epoch's weights: a clear error, not a traceback
    for kept in (out / "cv/repeat0/fold0/supervised/seed0/checkpoints").glob("epoch_*.pt"):
        kept.unlink()
    for cached in (out / "cv/repeat0/fold0/supervised/seed0").glob("predictions_test@*.csv"):
        cached.unlink()
    with pytest.raises(LymphdxError, match="training.keep_epochs"):
        compare(config, weak, strong, out, ["supervised"], [0], False, 2, 1, True)
