"""``lymphdx report``: one self-contained HTML page for a compare folder or a run folder."""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
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
# the browser of the two headless-Chromium tests: Debian's path, or LYMPHDX_CHROMIUM
CHROMIUM = Path(os.environ.get("LYMPHDX_CHROMIUM") or "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
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


def chromium_verdict(chromium: Path, env: Mapping[str, str]) -> tuple[str, str]:
    """What the browser tests do: ``("run", "")``, ``("skip", why)`` or ``("fail", why)``.

    A missing browser skips them on a developer's machine but fails them in CI (``CI``
    set and not empty), so that CI never passes without the browser check; the failure
    says that ``.ci/run`` installs it with apt and quotes apt's error from the file that
    ``.ci/chromium.sh`` names in ``LYMPHDX_CHROMIUM_APT_LOG``.
    """
    if chromium.is_file() and os.access(chromium, os.X_OK):
        return "run", ""
    why = f"no chromium at {chromium} to render the page"
    if not env.get("CI"):
        return "skip", f"{why} (install it, or set LYMPHDX_CHROMIUM to its path)"
    why += (
        "; CI is set, so the browser tests fail instead of skipping. .ci/run installs "
        "chromium with apt-get (.ci/chromium.sh); make that work, or set LYMPHDX_CHROMIUM"
    )
    log = Path(env.get("LYMPHDX_CHROMIUM_APT_LOG") or "/nonexistent")
    if log.is_file():
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
        said = " | ".join([line for line in lines if line][-5:]) or "nothing"
        why += f". apt-get said: {said}"
    return "fail", why


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The browser for the headless tests (``chromium_verdict``: skip, or fail in CI).
    Session-scoped, so that it is decided before the module's compare run is built."""
    verdict, why = chromium_verdict(CHROMIUM, os.environ)
    if verdict == "fail":
        pytest.fail(why, pytrace=False)
    if verdict == "skip":
        pytest.skip(why)
    return CHROMIUM


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
    # one paired test: its own family, Holm leaves its p as it is
    assert test["p_holm"] == pytest.approx(test["p_delong"])
    assert html.escape(test["design"]["text"]) in page
    assert "<th>p (Holm)</th>" in page and "<th>supports a claim</th>" in page
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


def test_page_renders_in_headless_chromium(
    chromium: Path, compare_report: Path, tmp_path: Path
) -> None:
    page = compare_report.read_text()
    dom = subprocess.run(
        [
            str(chromium),
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


def test_findings_table_screenshot_in_headless_chromium(
    chromium: Path, compare_report: Path, tmp_path: Path
) -> None:
    import matplotlib.image as mpimg

    from lymphdx.reporting.screenshot import screenshot_element

    pid = _findings_ids(compare_report.read_text())[0]
    png = screenshot_element(compare_report, f"findings-{pid}", tmp_path / "t.png", chromium)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    pixels = mpimg.imread(png)
    assert pixels.shape[:2] == (260, 900)  # the window: --window-size 900,260
    assert pixels[..., :3].std() > 0.01  # something drawn on the white page
    with pytest.raises(LymphdxError, match="no element"):
        screenshot_element(compare_report, "findings-nobody", tmp_path / "u.png", chromium)
    assert not (tmp_path / "u.png").exists()


# --------------------------------------------------------------------------- the browser in CI


def test_chromium_verdict(tmp_path: Path) -> None:
    missing = tmp_path / "no-chromium"
    browser = tmp_path / "chromium"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    assert chromium_verdict(browser, {"CI": "true"}) == ("run", "")
    assert chromium_verdict(browser, {}) == ("run", "")
    for env in ({}, {"CI": ""}):
        verdict, why = chromium_verdict(missing, env)
        assert verdict == "skip" and str(missing) in why
    verdict, why = chromium_verdict(missing, {"CI": "true"})
    assert verdict == "fail"
    for word in (str(missing), "CI is set", "fail instead of skipping", ".ci/run", "apt-get"):
        assert word in why, why
    log = tmp_path / "apt.log"
    log.write_text("Reading package lists...\nE: Unable to locate package chromium\n")
    verdict, why = chromium_verdict(missing, {"CI": "1", "LYMPHDX_CHROMIUM_APT_LOG": str(log)})
    assert verdict == "fail" and "apt-get said: " in why
    assert why.endswith("E: Unable to locate package chromium"), why


def test_browser_tests_fail_in_ci_without_chromium(tmp_path: Path) -> None:
    """As CI runs them (CI=true), with no browser: the two tests fail, none is skipped,
    and the failure names the missing browser and apt's error."""
    log = tmp_path / "apt.log"
    log.write_text(
        "E: Could not open lock file /var/lib/dpkg/lock-frontend (13: Permission denied)\n"
    )
    env = {
        **os.environ,
        "CI": "true",
        "LYMPHDX_CHROMIUM": str(tmp_path / "no-chromium"),
        "LYMPHDX_CHROMIUM_APT_LOG": str(log),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
        + [f"{__file__}::test_page_renders_in_headless_chromium"]
        + [f"{__file__}::test_findings_table_screenshot_in_headless_chromium"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 errors" in output and "skipped" not in output, output
    assert f"no chromium at {tmp_path / 'no-chromium'}" in output, output
    assert "13: Permission denied" in output, output


def test_ci_script_prints_and_keeps_apts_error(tmp_path: Path) -> None:
    """``.ci/chromium.sh`` with an apt-get that fails (a stand-in first on PATH; nothing is
    installed): it prints apt's error and leaves it for the tests in
    LYMPHDX_CHROMIUM_APT_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(
        "#!/bin/sh\n"
        'echo "apt-get $*" >> "$0.calls"\n'
        '[ "$1" = update ] && exit 0\n'
        'echo "E: Unable to locate package chromium" >&2\n'
        "exit 100\n"
    )
    apt.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CI": "true",
        "LYMPHDX_CHROMIUM": str(tmp_path / "no-chromium"),
        "TMPDIR": str(tmp_path),
    }
    script = 'source .ci/chromium.sh; echo "log=$LYMPHDX_CHROMIUM_APT_LOG"'
    result = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (bin_dir / "apt-get.calls").read_text().split("\n")[:2] == [
        "apt-get update -qq",
        "apt-get install -y -qq chromium",
    ]
    assert "the browser tests will fail (CI is set)" in result.stderr, result.stderr
    assert "E: Unable to locate package chromium" in result.stderr, result.stderr
    log = Path(result.stdout.split("log=", 1)[1].strip())
    assert "E: Unable to locate package chromium" in log.read_text()
    verdict, why = chromium_verdict(
        tmp_path / "no-chromium", {"CI": "true", "LYMPHDX_CHROMIUM_APT_LOG": str(log)}
    )
    assert verdict == "fail" and why.endswith("E: Unable to locate package chromium")
