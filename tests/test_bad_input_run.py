"""Bad input around a run folder (issue 28, items 3, 5 and 6).

* A ``best.pt`` that is no lymphdx checkpoint (random bytes, a pickle or a PyTorch archive
  that would run code, a truncated archive, an empty file, another PyTorch file) is
  refused with a message that says what it is, never PyTorch's ``weights_only=False``
  advice, and nothing in it runs.
* ``evaluate`` and ``predict --model`` on a run that another process is training (its
  lock held, here by a subprocess or this test) are refused, naming the holder; a run
  without ``best.pt`` is told apart: still training, or never finished (and what to do).
* Files scored from a checkpoint record it (SHA-256, epoch); when training replaces
  ``best.pt`` afterwards, ``compare`` scores the run again and ``report`` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lymphdx.core.config import dump_config
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import lock_holder, read_csv
from lymphdx.engine.run_folder import load_checkpoint, load_model, load_run_config
from lymphdx.engine.run_state import busy_note
from lymphdx.engine.train import train
from lymphdx.workflows.compare import compare, finished
from lymphdx.workflows.evaluate import evaluate_run, read_predictions
from lymphdx.workflows.predict import predict
from lymphdx.workflows.report import write_report
from tests.conftest import tiny_config
from tests.helpers import cli, manifests, one_error, one_thread  # noqa: F401  (fixture)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _calls_system(archive: zipfile.ZipFile) -> bool:
    """Whether the archive's pickle imports ``posix.system`` / ``os.system`` (its opcodes
    read with pickletools; nothing is unpickled)."""
    import pickletools

    name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
    globals_ = [
        str(arg).split()
        for op, arg, _ in pickletools.genops(archive.read(name))
        if op.name == "GLOBAL"
    ]
    return any(g[-1] == "system" and g[0] in ("posix", "os", "nt") for g in globals_)


class _Touch:
    """Unpickled, it would create ``marker`` (through the shell)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _no_torch_advice(message: str) -> None:
    assert "weights_only" not in message and "weights only" not in message.lower(), message
    assert "trusted source" not in message and "add_safe_globals" not in message, message


# -- item 5: files that are no lymphdx checkpoint ---------------------------------------


def test_a_torch_archive_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config_yaml": "", "x": _Touch(marker)}, path)
    assert zipfile.is_zipfile(path)  # a real torch.save archive
    with pytest.raises(LymphdxError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "holds executable objects (posix.system); refused" in msg
    _no_torch_advice(msg)
    assert not marker.exists()
    # the file is truly malicious: its pickle calls os.system (read, never run here)
    assert _calls_system(zipfile.ZipFile(path))


def test_a_plain_pickle_that_would_run_code_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    path.write_bytes(pickle.dumps({"model": _Touch(marker)}))
    with pytest.raises(LymphdxError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "is not a lymphdx checkpoint (a plain pickle, not a torch.save archive" in msg
    _no_torch_advice(msg)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # and it would have run
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("random", "(unrecognised content, not a PyTorch checkpoint archive)"),
        ("empty", "(an empty file)"),
        ("truncated", "a damaged or truncated PyTorch archive"),
        ("foreign zip", "a damaged or foreign PyTorch file"),
        ("other keys", "a PyTorch file holding a mapping of epoch, weights, not the weights"),
        ("tensor", "a PyTorch file holding a Tensor"),
    ],
)
def test_files_that_are_no_lymphdx_checkpoint(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "best.pt"
    if content == "random":
        data = np.random.default_rng(0).bytes(4096)
        assert data[:1] != b"\x80" and data[:2] != b"PK"
        path.write_bytes(data)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":  # a copy that stopped half-way
        torch.save({"model": {"w": torch.ones(1000)}, "config_yaml": ""}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "foreign zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a model")
    elif content == "other keys":  # another program's checkpoint
        torch.save({"epoch": 3, "weights": {"w": torch.ones(2)}}, path)
    else:
        torch.save(torch.ones(3), path)
    with pytest.raises(LymphdxError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} is not a lymphdx checkpoint (") and words in msg, msg
    assert msg.endswith("refused")
    _no_torch_advice(msg)


def test_evaluate_and_predict_refuse_a_crafted_best_pt_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(tiny_config(tmp_path)))
    marker = tmp_path / "pwned"
    torch.save({"model": _Touch(marker)}, run / "checkpoints" / "best.pt")
    one_error(*cli("evaluate", run), "holds executable objects", "refused")
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    code, out = cli("predict", "--model", run, "--out", tmp_path / "out", scan)
    one_error(code, out, "holds executable objects", "refused")
    assert "weights_only" not in out
    assert not marker.exists()


# -- a trained run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multitask run of one epoch (not evaluated)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp, strategy="multitask", training={"epochs": 1})
    train(config, tmp / "run", *manifests(tiny_data), progress=False)
    return tmp / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _set_training(run: Path, **values: object) -> None:
    """Change keys of ``training`` in the run's ``config.yaml``."""
    path = run / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["training"].update(values)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _retrained(run: Path) -> str:
    """Replace ``best.pt`` as a later, better epoch of training would (other weights,
    epoch 1); returns its new SHA-256."""
    path = run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    weights = state["model"]
    state["model"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in weights.items()}
    state["best"] = {**state["best"], "epoch": 1}
    torch.save(state, path)
    return _sha(path)


def test_weights_of_another_model_are_refused(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    path = run / "checkpoints" / "best.pt"
    state = torch.load(path, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(LymphdxError, match="does not hold weights of the model its config"):
        load_model(run)


# -- items 3 and 6: a run that is still training, or never finished ------------------------

HOLDER = """
import sys
from lymphdx.core.files import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def _held(run: Path, purpose: str) -> Iterator[int]:
    """Another process holds ``run``'s lock for ``purpose`` (as ``train`` and ``evaluate``
    do) while the block runs; yields its pid."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), purpose],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.communicate("")  # let go
    assert proc.returncode == 0


@pytest.fixture()
def training(trained: Path, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A copy of the run that another process is training (holds its lock)."""
    run = _copy(trained, tmp_path)
    with _held(run, "training") as pid:
        yield run, pid


def test_evaluate_and_predict_refuse_a_run_that_is_training(training, tmp_path: Path) -> None:
    run, pid = training
    holder = lock_holder(run)
    assert holder is not None and holder[:2] == (str(pid), "training")
    line = one_error(*cli("evaluate", run), f"run {run} is still training (pid {pid}, since")
    assert "1 of 1 epochs done" in line and "evaluate it after it finishes" in line
    assert f"lymphdx train --out {run} --resume" in line
    assert not (run / "metrics.json").exists()
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    code, out = cli("predict", "--model", run, "--out", tmp_path / "out", scan)
    one_error(code, out, "is still training", "predict with it after it finishes")
    assert not (tmp_path / "out").exists()


def test_a_run_without_best_pt_is_training_or_never_finished(training) -> None:
    run, pid = training
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(LymphdxError) as err:
        load_model(run)
    assert f"is still training (pid {pid}" in str(err.value)
    assert "not written checkpoints/best.pt yet, which it does when its first epoch ends: wait" in (
        str(err.value)
    )
    _set_training(run, selection="last")
    line = one_error(*cli("evaluate", run), f"run {run} is still training (pid {pid}")
    assert "which it does when its last epoch ends (training.selection: last)" in line
    assert line.endswith("evaluate it after it finishes") and "stop it" not in line


@pytest.mark.parametrize("epochs", [0, 1])
def test_a_run_without_best_pt_that_no_process_trains_never_finished(
    trained: Path, tmp_path: Path, epochs: int
) -> None:
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "best.pt").unlink()
    # killed before its first epoch ended, or (selection: last) before its last one
    _set_training(run, epochs=3, selection="last")
    if epochs == 0:  # no epoch ended: no history either
        (run / "history.csv").unlink()
    assert busy_note(run) is None
    line = one_error(*cli("evaluate", run), f"run {run} never finished", "no checkpoints/best.pt")
    assert f"`lymphdx train --out {run} --resume`" in line and "no process is training" in line
    if epochs:
        assert "stopped after 1 of 3 epochs" in line
        assert "with training.selection: last, best.pt is written when the last epoch" in line
    else:
        assert "stopped before its first epoch ended" in line
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    code, out = cli("predict", "--model", run, "--out", tmp_path / "out", scan)
    one_error(code, out, "never finished", "--resume")


def test_a_lock_left_by_a_killed_process_is_not_held(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    (run / ".lock").write_text("999999 training")  # its holder was killed (SIGKILL)
    assert lock_holder(run) is None and busy_note(run) is None
    assert load_model(run)[2]["source"]["sha256"] == _sha(run / "checkpoints" / "best.pt")


def test_training_waits_for_evaluate_and_evaluate_for_evaluate(
    trained: Path, tmp_path: Path, tiny_data: Path
) -> None:
    run = _copy(trained, tmp_path)
    with _held(run, "evaluating"):
        with pytest.raises(LymphdxError, match=r"\(pid \d+\) is evaluating"):
            config = tiny_config(tmp_path, strategy="multitask", training={"epochs": 2})
            train(config, run, *manifests(tiny_data), resume=True, progress=False)
        with pytest.raises(LymphdxError, match="is being evaluated by another lymphdx process"):
            evaluate_run(run)


def test_evaluate_warns_about_a_run_that_stopped_early(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(trained, tmp_path)
    _set_training(run, epochs=4)  # config.yaml: its epochs, extended by --resume --epochs
    evaluate_run(run, detection=False)
    assert "stopped after 1 of 4 epochs" in caplog.text and "--resume" in caplog.text
    assert not finished(run)  # compare would resume it, though metrics.json exists
    _set_training(run, epochs=1)
    assert finished(run)


# -- item 3: scores record their checkpoint; stale ones are re-scored or reported ------------


def test_derived_files_record_their_checkpoint(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path)
    sha = _sha(run / "checkpoints" / "best.pt")
    metrics = evaluate_run(run)
    best_epoch = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["best"]["epoch"]
    want = {"file": "checkpoints/best.pt", "sha256": sha, "best_epoch": best_epoch}
    for name in ("metrics.json", "detection.json"):
        record = json.loads((run / name).read_text())["checkpoint"]
        assert {k: record[k] for k in want} == want and record["epochs_trained"] == 1
    assert metrics["checkpoint"]["sha256"] == sha
    weak = Path(load_run_config(run).manifests.weak)
    image = weak.parent / read_csv(weak)[0]["image"]
    predict(run, [image], tmp_path / "out")
    prediction = json.loads(next((tmp_path / "out").rglob("prediction.json")).read_text())
    assert prediction["checkpoint"]["sha256"] == sha


def test_report_says_which_scores_are_stale(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _copy(trained, tmp_path)
    evaluate_run(run)
    assert "Warning: results not from" not in write_report(run).read_text()
    old = json.loads((run / "metrics.json").read_text())["checkpoint"]["sha256"]
    _retrained(run)  # training went on after this evaluation
    page = write_report(run).read_text()
    assert "Warning: results not from the runs&#x27; final models" in page or (
        "Warning: results not from the runs' final models" in page
    )
    assert f"metrics.json was scored from an earlier checkpoints/best.pt of run {run}" in page
    assert f"(epoch 0, sha256 {old[:12]}…)" in page and "detection.json was scored" in page
    assert "metrics.json was scored from an earlier" in caplog.text  # and on the terminal
    # a metrics.json of an older lymphdx (no record): stale when older than best.pt
    for name in ("metrics.json", "detection.json"):
        data = json.loads((run / name).read_text())
        del data["checkpoint"]
        (run / name).write_text(json.dumps(data))
    best = run / "checkpoints" / "best.pt"
    later = (run / "metrics.json").stat().st_mtime + 60
    os.utime(best, (later, later))
    assert "records no checkpoint (an older lymphdx wrote it)" in write_report(run).read_text()
    os.utime(best, (later - 120, later - 120))
    assert "Warning: results not from" not in write_report(run).read_text()


def test_compare_scores_again_a_run_trained_further_since(
    trained: Path, tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmp"
    seed0 = out / "runs" / "multitask" / "seed0"
    shutil.copytree(trained, seed0)
    config = tiny_config(tmp_path, strategy="multitask", training={"epochs": 1})
    evaluate_run(seed0)
    compare(config, *manifests(tiny_data), out, ["multitask"], [0], progress=False)
    results = json.loads((out / "results.json").read_text())
    first = _sha(seed0 / "checkpoints" / "best.pt")
    assert results["checkpoints"]["runs/multitask/seed0"]["sha256"] == first
    before = read_predictions(seed0 / "predictions_test.csv")

    new = _retrained(seed0)  # e.g. evaluated while training, which went on
    page = write_report(out).read_text()
    assert "results.json was scored from an earlier checkpoints/best.pt" in page
    results = compare(config, *manifests(tiny_data), out, ["multitask"], [0], progress=True)
    assert "multitask seed 0: scored again (" in capsys.readouterr().out
    metrics = json.loads((seed0 / "metrics.json").read_text())
    assert metrics["checkpoint"]["sha256"] == new
    assert json.loads((seed0 / "detection.json").read_text())["checkpoint"]["sha256"] == new
    assert results["checkpoints"]["runs/multitask/seed0"]["sha256"] == new
    after = read_predictions(seed0 / "predictions_test.csv")
    assert after != before  # the new weights' scores, in the table too
    assert results["strategies"]["multitask"]["test_auc"][0] == pytest.approx(metrics["auc"])
    assert "Warning: results not from" not in write_report(out).read_text()
    # current now: a third compare keeps it as it is
    kept = (seed0 / "metrics.json").read_bytes()
    compare(config, *manifests(tiny_data), out, ["multitask"], [0], progress=False)
    assert (seed0 / "metrics.json").read_bytes() == kept
    with _held(seed0, "training") as pid:  # someone trains it further: not collected now
        with pytest.raises(LymphdxError, match=rf"still training \(pid {pid}.*compare again after"):
            compare(config, *manifests(tiny_data), out, ["multitask"], [0], progress=False)
        assert "is still training" in write_report(out).read_text()
