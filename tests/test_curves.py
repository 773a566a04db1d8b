"""Learning curves (``lymphdx.reporting.curves``) from hand-written ``history.csv`` files."""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from lymphdx.core.errors import LymphdxError
from lymphdx.reporting.curves import (
    find_runs,
    has_dice,
    learning_curves_figure,
    mean_curve,
    plot_learning_curves,
    read_curves,
    summarize,
)
from tests.helpers import write_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]

FULL = [
    "epoch",
    "loss",
    "val_auc",
    "strong_val_dice",
    "propagated",
    "step",
    "phase",
    "propagation_note",
]
# ssmdmt: ROI warm-up for epochs 0-1, first propagation at the start of epoch 3
SSMDMT_SEED0 = [
    [0, 1.0, 0.50, 0.10, 0, 10, "roi-warmup", "warm-up until epoch 3"],
    [1, 0.9, 0.55, 0.30, 0, 20, "roi-warmup", "warm-up until epoch 3"],
    [2, 0.8, 0.70, 0.40, 0, 30, "joint", "warm-up until epoch 3"],
    [3, 0.7, 0.80, 0.50, 1, 40, "joint", "started at epoch 3"],
    [4, 0.6, 0.75, 0.45, 1, 50, "joint", ""],
]
# a shorter second seed: shares steps 10, 20, 30 with seed 0; never propagated
SSMDMT_SEED1 = [
    [0, 1.1, 0.40, 0.00, 0, 10, "roi-warmup", ""],
    [1, 1.0, 0.45, 0.20, 0, 20, "roi-warmup", ""],
    [2, 0.9, 0.60, 0.35, 0, 30, "joint", ""],
]
# an old run: no step column (steps are epoch + 1), no Dice (supervised has no ROI loss)
OLD = ["epoch", "loss", "val_auc", "strong_val_dice", "propagated", "phase", "propagation_note"]
SUPERVISED_SEED0 = [
    [0, 0.70, 0.40, "", 0, "joint", ""],
    [1, 0.60, 0.60, "", 0, "joint", ""],
    [2, 0.50, 0.65, "", 0, "joint", ""],
]
SUPERVISED_SEED1 = [
    [0, 0.70, 0.50, "", 0, 10, "joint", ""],
    [1, 0.60, 0.55, "", 0, 20, "joint", ""],
    [2, 0.50, "", "", 0, 30, "joint", ""],  # validation AUC missing this epoch
]


def _run(folder: Path, strategy: str, seed: int, header: list[str], rows: list[list]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "history.csv", header, rows)
    config = {"strategy": strategy, "seed": seed, "evaluation": {"bootstrap": 50, "ci": 0.95}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def _split_compare(root: Path) -> Path:
    """``runs/<strategy>/seed<k>/`` with the four hand-written histories."""
    _run(root / "runs" / "supervised" / "seed0", "supervised", 0, OLD, SUPERVISED_SEED0)
    _run(root / "runs" / "supervised" / "seed1", "supervised", 1, FULL, SUPERVISED_SEED1)
    _run(root / "runs" / "ssmdmt" / "seed0", "ssmdmt", 0, FULL, SSMDMT_SEED0)
    _run(root / "runs" / "ssmdmt" / "seed1", "ssmdmt", 1, FULL, SSMDMT_SEED1)
    (root / "runs" / "ssmdmt" / "seed2").mkdir()  # started, no history yet: not a run
    return root


def test_read_curves_matches_the_hand_written_history(tmp_path: Path) -> None:
    runs = find_runs(_split_compare(tmp_path / "cmp"))
    assert list(runs) == ["supervised", "ssmdmt"]  # STRATEGIES order
    curves = read_curves(runs)
    sup0, sup1 = curves["supervised"]
    ss0, ss1 = curves["ssmdmt"]
    assert [r["name"] for r in (sup0, sup1, ss0, ss1)] == ["seed0", "seed1"] * 2

    np.testing.assert_array_equal(ss0["step"], [10, 20, 30, 40, 50])
    np.testing.assert_array_equal(ss0["epoch"], [0, 1, 2, 3, 4])
    np.testing.assert_allclose(ss0["val_auc"], [r[2] for r in SSMDMT_SEED0])
    np.testing.assert_allclose(ss0["strong_val_dice"], [r[3] for r in SSMDMT_SEED0])
    assert ss0["warmup_end_step"] == 20  # end of epoch 1, the last warm-up epoch
    assert ss0["first_propagation_step"] == 30  # start of epoch 3 = end of epoch 2
    assert ss1["warmup_end_step"] == 20 and ss1["first_propagation_step"] is None
    assert not ss0["step_is_epoch"]

    # no step column: epoch + 1; no Dice: all NaN; never in a warm-up
    np.testing.assert_array_equal(sup0["step"], [1, 2, 3])
    assert sup0["step_is_epoch"] and not sup1["step_is_epoch"]
    np.testing.assert_allclose(sup0["val_auc"], [0.40, 0.60, 0.65])
    assert np.isnan(sup0["strong_val_dice"]).all()
    assert sup0["warmup_end_step"] is None and sup0["first_propagation_step"] is None
    np.testing.assert_array_equal(sup1["step"], [10, 20, 30])
    np.testing.assert_allclose(sup1["val_auc"], [0.50, 0.55, np.nan])
    assert has_dice(curves["ssmdmt"]) and not has_dice(curves["supervised"])

    # the mean over runs at the steps they share
    steps, mean = mean_curve(curves["ssmdmt"], "val_auc")
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_allclose(mean, [0.45, 0.50, 0.65])
    steps, mean = mean_curve(curves["supervised"], "val_auc")
    assert len(steps) == 0  # seed0 counts epochs, seed1 steps: nothing shared

    rows = {(r["strategy"], r["metric"]): r for r in summarize(curves)}
    assert ("supervised", "strong_val_dice") not in rows
    auc = rows[("ssmdmt", "val_auc")]
    assert auc["final"] == pytest.approx((0.75 + 0.60) / 2)
    assert auc["final_step"] == pytest.approx((50 + 30) / 2)
    assert auc["max"] == pytest.approx((0.80 + 0.60) / 2)
    assert auc["max_step"] == pytest.approx((40 + 30) / 2)
    assert rows[("supervised", "val_auc")]["final_step"] == pytest.approx((3 + 20) / 2)


def test_find_runs_both_layouts_and_a_single_run(tmp_path: Path) -> None:
    cv = tmp_path / "cv_cmp"
    for r in range(2):
        for f in range(2):
            for s in ("multitask", "supervised"):
                base = cv / "cv" / f"repeat{r}" / f"fold{f}" / s / "seed0"
                _run(base, s, 0, FULL, SSMDMT_SEED1)
    found = find_runs(cv)
    assert list(found) == ["supervised", "multitask"]
    assert [p.relative_to(cv).as_posix() for p in found["multitask"]] == [
        f"cv/repeat{r}/fold{f}/multitask/seed0" for r in range(2) for f in range(2)
    ]
    curves = read_curves(found)
    assert [c["name"] for c in curves["supervised"]] == [
        "repeat0/fold0/seed0",
        "repeat0/fold1/seed0",
        "repeat1/fold0/seed0",
        "repeat1/fold1/seed0",
    ]

    split = find_runs(_split_compare(tmp_path / "split_cmp"))
    assert {s: len(v) for s, v in split.items()} == {"supervised": 2, "ssmdmt": 2}

    single = _run(tmp_path / "one_run", "multitask", 3, FULL, SSMDMT_SEED0)
    assert find_runs(single) == {"multitask": [single]}
    with pytest.raises(LymphdxError, match="no run with a history.csv"):
        find_runs(tmp_path / "cv_cmp" / "cv")
    with pytest.raises(LymphdxError, match="not a folder"):
        find_runs(tmp_path / "missing")


def test_plot_writes_a_png_and_leaves_dice_less_strategies_out(tmp_path: Path) -> None:
    from matplotlib.image import imread

    curves = read_curves(find_runs(_split_compare(tmp_path / "cmp")))
    out = plot_learning_curves(curves, tmp_path / "figs" / "curves.png")
    assert out == tmp_path / "figs" / "curves.png"
    assert out.read_bytes().startswith(PNG_MAGIC)
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary left
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        with Image.open(out) as im:
            im.verify()

    import matplotlib.pyplot as plt

    fig = learning_curves_figure(curves)
    try:
        ax_auc, ax_dice = fig.axes
        assert ax_auc.get_title() == "weak-validation AUC"
        assert ax_dice.get_title() == "strong-validation Dice"
        assert ax_auc.get_legend_handles_labels()[1] == ["supervised (2 runs)", "ssmdmt (2 runs)"]
        assert ax_dice.get_legend_handles_labels()[1] == ["ssmdmt (2 runs)"]
        # warm-up end (dashed) at step 20 and first propagation (dotted) at step 30
        vertical = {
            (line.get_linestyle(), float(line.get_xdata()[0]))
            for line in ax_dice.get_lines()
            if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]
        }
        assert vertical == {("--", 20.0), (":", 30.0)}
    finally:
        plt.close(fig)


def test_benchmark_script_prints_a_markdown_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location(
        "learning_curves_bench", REPO / "benchmarks" / "learning_curves.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "lc.png"
    assert module.main([str(_split_compare(tmp_path / "cmp")), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    text = capsys.readouterr().out
    assert "| strategy | metric | runs | final | at step | max | at step |" in text
    assert "| ssmdmt | weak-val AUC | 2 | 0.675 | 40 | 0.700 | 35 |" in text
    assert "| ssmdmt | strong-val Dice | 2 | 0.400 | 40 | 0.425 | 35 |" in text
    assert "| supervised | weak-val AUC | 2 | 0.600 | 12 (epochs) | 0.600 | 12 (epochs) |" in text
    assert "supervised | strong-val Dice" not in text
    assert module.main([str(tmp_path / "empty"), "--out", str(out)]) == 2


def _fake_compare(root: Path) -> Path:
    """A compare folder as write_report reads it, without training: results.json,
    test_predictions.csv and the four run folders (no checkpoints)."""
    _split_compare(root)
    rng = np.random.default_rng(0)
    labels = [0, 1] * 5
    rows = []
    for s in ("supervised", "ssmdmt"):
        for seed in (0, 1):
            for i, y in enumerate(labels):
                p = float(np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2), 0, 1))
                rows.append([s, seed, f"P{i:02d}", y, f"{p:.4f}"])
    write_csv(
        root / "test_predictions.csv",
        ["strategy", "seed", "patient_id", "label", "probability"],
        rows,
    )
    entry = {"test_auc_mean": 0.7, "test_auc_sd": 0.05, "test_auc_ci95": [0.4, 0.9]}
    results = {
        "strategies": {"supervised": {**entry, "test_auc": [0.65, 0.75]}, "ssmdmt": {**entry}},
        "n_test": len(labels),
        "n_test_pos": sum(labels),
        "seeds": [0, 1],
        "paired_tests": {},
    }
    (root / "results.json").write_text(json.dumps(results))
    return root


def test_report_has_a_learning_curves_section(tmp_path: Path) -> None:
    from lymphdx.reporting.sections import learning_curves_section
    from lymphdx.workflows.report import write_report

    page = write_report(_fake_compare(tmp_path / "cmp")).read_text()
    section = re.search(
        r'<section id="learning"><h2>Learning curves</h2>(.*?)</section>', page, re.S
    )
    assert section, "no Learning curves section"
    assert '<a href="#learning">Learning curves</a>' in page
    body = section.group(1)
    assert "a run has learned when its validation AUC" in body
    uri = re.search(r'<img class="learning" src="data:image/png;base64,([^"]+)"', body)
    assert uri and base64.b64decode(uri.group(1), validate=True).startswith(PNG_MAGIC)
    assert "4 run(s)" in body

    assert learning_curves_section({}) == "<p>No history.csv found.</p>"


def test_history_rows_written_by_csv_module_round_trip(tmp_path: Path) -> None:
    """A resumed run may repeat an epoch: the last row of it counts."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FULL)
        w.writerows(SSMDMT_SEED1[:2])
        w.writerow([1, 0.95, 0.47, 0.25, 0, 20, "roi-warmup", ""])
        w.writerow(SSMDMT_SEED1[2])
    (curve,) = read_curves({"ssmdmt": [run]})["ssmdmt"]
    np.testing.assert_allclose(curve["val_auc"], [0.40, 0.47, 0.60])
    np.testing.assert_array_equal(curve["step"], [10, 20, 30])
