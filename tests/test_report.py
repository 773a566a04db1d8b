"""``lymphdx report``: one self-contained HTML page for a compare folder or a run folder."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_curve
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.errors import LymphdxError
from lymphdx.reporting.table import LABELS
from lymphdx.stats.roc import FPR_GRID, roc_band, tpr_at_fpr
from lymphdx.workflows.compare import compare
from lymphdx.workflows.report import write_report
from tests.conftest import tiny_config

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r"<img\b[^>]*>")
SRC = re.compile(r'\bsrc="([^"]*)"')


@pytest.fixture(scope="module")
def compared(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split-mode compare folder: supervised and multitask, one seed, one epoch."""
    tmp = tmp_path_factory.mktemp("report")
    config = tiny_config(tmp, training={"epochs": 1})
    out = tmp / "cmp"
    compare(
        config,
        tiny_data / "weak" / "manifest.csv",
        tiny_data / "strong" / "manifest.csv",
        out,
        ["supervised", "multitask"],
        [0],
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def compare_report(compared: Path) -> Path:
    return write_report(compared)


def _images(page: str) -> list[bytes]:
    """Every ``<img>`` of the page decoded; fails on anything but an inline PNG."""
    out = []
    for tag in IMG.findall(page):
        src = SRC.search(tag)
        assert src, tag[:80]
        prefix = "data:image/png;base64,"
        assert src.group(1).startswith(prefix), src.group(1)[:60]
        png = base64.b64decode(src.group(1)[len(prefix) :], validate=True)
        assert png.startswith(PNG_MAGIC)
        out.append(png)
    return out


def _overlay_patients(run: Path) -> set[str]:
    """The highest-probability and the most wrong test patient of a run (one or two)."""
    with open(run / "predictions_test.csv", newline="") as f:
        rows = {
            r["patient_id"]: (int(r["label"]), float(r["probability"])) for r in csv.DictReader(f)
        }
    ids = sorted(rows)
    return {
        max(ids, key=lambda p: rows[p][1]),
        max(ids, key=lambda p: abs(rows[p][0] - rows[p][1])),
    }


def _seed_averaged(test_predictions: Path) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """labels and strategy -> patient -> mean probability over seeds, from compare's CSV."""
    labels: dict[str, int] = {}
    sums: dict[str, dict[str, list[float]]] = {}
    with open(test_predictions, newline="") as f:
        for r in csv.DictReader(f):
            labels[r["patient_id"]] = int(r["label"])
            sums.setdefault(r["strategy"], {}).setdefault(r["patient_id"], []).append(
                float(r["probability"])
            )
    return labels, {s: {p: float(np.mean(v)) for p, v in d.items()} for s, d in sums.items()}


def test_compare_report_page(compared: Path, compare_report: Path) -> None:
    assert compare_report == compared / "report.html"
    page = compare_report.read_text()
    results = json.loads((compared / "results.json").read_text())

    # Table I rows and the paired test, as results.json has them
    for s, r in results["strategies"].items():
        assert LABELS[s] in page
        assert f"{r['test_auc_mean']:.3f} ± {r['test_auc_sd']:.3f}" in page
        lo, hi = r["test_auc_ci95"]
        assert f"[{lo:.3f}, {hi:.3f}]" in page
    test = results["paired_tests"]["multitask vs supervised"]
    lo, hi = test["delta_ci95"]
    assert f"{test['delta_auc']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in page
    assert f"{test['p_delong']:.3f}" in page
    assert html.escape(test["power_text"]) in page
    for section in (
        "ROC curves",
        "Calibration",
        "FROC",
        "Overlays",
        "Training curves",
        "Learning curves",
    ):
        assert f">{section}" in page
    for item in ("Data sources", "Model selection", "Preprocessing", "Software", "Seeds"):
        assert f"<td>{item}</td>" in page

    # Brier scores: sklearn's on the seed-averaged predictions
    labels, averaged = _seed_averaged(compared / "test_predictions.csv")
    shown = dict(re.findall(r'data-strategy="([^"]+)" data-brier="([^"]+)"', page))
    assert set(shown) == set(results["strategies"])
    for s, value in shown.items():
        ids = sorted(averaged[s])
        expected = brier_score_loss([labels[p] for p in ids], [averaged[s][p] for p in ids])
        assert float(value) == pytest.approx(expected, abs=1e-12)

    # self-contained: every image an inline PNG, nothing fetched from elsewhere
    images = _images(page)
    best = max(results["strategies"], key=lambda s: results["strategies"][s]["test_auc_mean"])
    shown_cases = _overlay_patients(compared / "runs" / best / "seed0")
    assert page.count('class="overlay"') == len(shown_cases) and "no overlay" not in page
    for pid in shown_cases:
        assert f"patient {pid}, label" in page
    # ROC, calibration, FROC (multitask has detection.json), overlays, 2 training figures,
    # learning curves
    assert len(images) == 6 + len(shown_cases)
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<link" not in page and "<script src" not in page and "url(" not in page

    # the per-patient CSV: one row per test patient, seed-averaged probabilities
    assert 'href="report_predictions.csv"' in page
    with open(compared / "report_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["patient_id", "label", "supervised", "multitask"]
    assert len(rows) == results["n_test"] == len({r["patient_id"] for r in rows})
    with open(compared / "runs" / "supervised" / "seed0" / "splits.csv", newline="") as f:
        test_ids = {r["patient_id"] for r in csv.DictReader(f) if r["set"] == "weak"}
    assert {r["patient_id"] for r in rows} <= test_ids
    for r in rows:
        assert int(r["label"]) == labels[r["patient_id"]]
        for s in ("supervised", "multitask"):
            assert float(r[s]) == pytest.approx(averaged[s][r["patient_id"]], abs=1e-6)


def test_run_report_and_missing_checkpoint(compared: Path, tmp_path: Path) -> None:
    run = compared / "runs" / "multitask" / "seed0"
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert str(run / "report.html") in result.output
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['auc']:.3f}" in page and "Test metrics" in page
    n_cases = len(_overlay_patients(run))
    assert 'class="froc"' in page and page.count('class="overlay"') == n_cases
    # ROC, calibration, FROC, overlays, training, learning curves
    assert len(_images(page)) == 5 + n_cases
    with open(run / "report_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n"] and list(rows[0]) == ["patient_id", "label", "multitask"]

    # without the checkpoint the page says so instead of failing
    bare = tmp_path / "bare_run"
    bare.mkdir()
    for name in ("config.yaml", "history.csv", "metrics.json", "predictions_test.csv"):
        shutil.copy(run / name, bare / name)
    page = write_report(bare).read_text()
    assert page.count("no overlay: the checkpoint") == n_cases and "is missing" in page
    assert len(_images(page)) == 4  # ROC, calibration, training, learning curves


def test_not_a_run_or_compare_folder(tmp_path: Path) -> None:
    with pytest.raises(LymphdxError, match="neither a lymphdx compare folder"):
        write_report(tmp_path)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(LymphdxError, match="not a folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "config.yaml").write_text("strategy: supervised\n")
    with pytest.raises(LymphdxError, match="lymphdx evaluate"):
        write_report(tmp_path)


def test_roc_band_is_the_step_roc_of_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) * 0.6 + 0.4 * y, 1)  # many ties
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    expected = [tpr[fpr <= f + 1e-12].max() for f in FPR_GRID]
    np.testing.assert_allclose(tpr_at_fpr(y, scores), expected)
    lo, hi = roc_band(y, scores, n=300)
    assert np.all(lo <= hi) and lo.min() >= 0 and hi.max() <= 1
    assert np.all(np.diff(lo) >= 0) and np.all(np.diff(hi) >= 0)
    assert hi[-1] == 1.0 and np.mean((lo <= expected) & (np.array(expected) <= hi)) > 0.9


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium to render the page")
def test_page_renders_in_headless_chromium(compare_report: Path, tmp_path: Path) -> None:
    page = compare_report.read_text()
    dom = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            compare_report.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    n = len(IMG.findall(page))
    assert n >= 6 and len(IMG.findall(dom)) == n
    # the page's own script: every image complete with naturalWidth > 0
    assert 'data-images-ok="1"' in dom and f'data-images-count="{n}"' in dom


def _findings_ids(page: str) -> list[str]:
    return re.findall(r'<div class="findings" id="findings-([^"]+)">', page)


def test_report_shows_the_overlay_patients_node_findings(compare_report: Path) -> None:
    page = compare_report.read_text()
    ids = _findings_ids(page)
    assert ids and len(ids) == len(set(ids))  # one table per overlay patient
    for pid in ids:
        block = page.split(f'id="findings-{pid}">', 1)[1].split("</div>", 1)[0]
        assert "short axis (mm)" in block or "No node candidate" in block


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium to render the page")
def test_findings_table_screenshot_in_headless_chromium(
    compare_report: Path, tmp_path: Path
) -> None:
    import matplotlib.image as mpimg

    from lymphdx.reporting.screenshot import screenshot_element

    pid = _findings_ids(compare_report.read_text())[0]
    png = screenshot_element(compare_report, f"findings-{pid}", tmp_path / "t.png", CHROMIUM)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    pixels = mpimg.imread(png)
    assert pixels.shape[:2] == (260, 900)  # the window: --window-size 900,260
    assert pixels[..., :3].std() > 0.01  # something drawn on the white page
    with pytest.raises(LymphdxError, match="no element"):
        screenshot_element(compare_report, "findings-nobody", tmp_path / "u.png", CHROMIUM)
    assert not (tmp_path / "u.png").exists()
