"""Trainer-side faults: changed data under a checkpoint, full disk, NaN loss, two writers,
a step that will not fit in memory, unsafe checkpoint files."""

from __future__ import annotations

import csv
import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import run_lock
from lymphdx.engine import steps
from lymphdx.engine.run_folder import TrainingError, load_checkpoint, load_model
from lymphdx.engine.train import train
from tests.conftest import tiny_config


def _copy_data(src: Path, dst: Path) -> tuple[Path, Path]:
    shutil.copytree(src, dst)
    return dst / "weak" / "manifest.csv", dst / "strong" / "manifest.csv"


@pytest.fixture()
def one_epoch_run(tiny_data: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    weak, strong = _copy_data(tiny_data, tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(tmp_path, training={"epochs": 1}), run, weak, strong, progress=False)
    return run, weak, strong


def test_resume_refuses_a_changed_manifest(one_epoch_run, tmp_path: Path) -> None:
    run, weak, strong = one_epoch_run
    rows = list(csv.DictReader(open(weak)))
    # the scan of a patient was replaced (re-exported) under a new file name
    old = weak.parent / rows[0]["image"]
    new = old.with_name("reexport_" + old.name)
    shutil.copy(old, new)
    rows[0]["image"] = str(new.relative_to(weak.parent))
    with open(weak, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = tiny_config(tmp_path, training={"epochs": 2})
    with pytest.raises(LymphdxError, match=r"weak manifest changed since the checkpoint"):
        train(cfg, run, weak, strong, resume=True, progress=False)


def test_predict_and_resume_refuse_changed_splits_config_or_version(one_epoch_run) -> None:
    run, _, _ = one_epoch_run
    load_model(run)  # the untouched run loads
    splits = run / "splits.csv"
    original = splits.read_text()
    # someone moved a patient from the training to the test split
    first = original.splitlines()[1]
    assert first.startswith("weak,") and ",train," in first
    splits.write_text(original.replace(first, first.replace(",train,", ",test,"), 1))
    with pytest.raises(LymphdxError, match=r"splits.csv changed since the checkpoint was written"):
        load_model(run)
    splits.write_text(original)
    cfg_path = run / "config.yaml"
    cfg_text = cfg_path.read_text()
    cfg_path.write_text(cfg_text.replace("growth_rate: 4", "growth_rate: 6"))
    with pytest.raises(LymphdxError, match=r"config differs.*model.growth_rate: 4 -> 6"):
        load_model(run)
    cfg_path.write_text(cfg_text)
    best = run / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    state["lymphdx_version"] = "9.3.0"
    torch.save(state, best)
    with pytest.raises(LymphdxError, match=r"written by lymphdx 9.3.0, this is"):
        load_model(run)


def test_a_pickled_object_in_a_checkpoint_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(LymphdxError, match="not a lymphdx checkpoint .a plain pickle") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)
    assert not marker.exists()


def test_full_disk_during_a_checkpoint_write_keeps_the_last_good_one(
    one_epoch_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, weak, strong = one_epoch_run
    good = load_checkpoint(run / "checkpoints" / "last.pt")
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # type: ignore[no-untyped-def]
        with open(f, "wb") as out:
            out.write(b"\0" * 1000)  # some bytes made it, then the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = tiny_config(tmp_path, training={"epochs": 2})
    with pytest.raises(LymphdxError) as err:
        train(cfg, run, weak, strong, resume=True, progress=False)
    msg = str(err.value)
    assert "No space left on device" in msg and "last.pt" in msg or "best.pt" in msg
    monkeypatch.setattr(torch, "save", real_save)
    kept = load_checkpoint(run / "checkpoints" / "last.pt")
    assert kept["epoch"] == good["epoch"] == 1
    assert not [p for p in run.rglob(".tmp-*")]
    train(cfg, run, weak, strong, resume=True, progress=False)  # space is back: it goes on
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_nan_loss_stops_naming_term_and_batch_and_keeps_last_checkpoint(
    one_epoch_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, weak, strong = one_epoch_run
    before = load_checkpoint(run / "checkpoints" / "last.pt")
    real = steps.classification_loss

    def nan_loss(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(steps, "classification_loss", nan_loss)
    cfg = tiny_config(tmp_path, training={"epochs": 2})
    with pytest.raises(TrainingError) as err:
        train(cfg, run, weak, strong, resume=True, progress=False)
    msg = str(err.value)
    assert "loss term 'cls' became nan at epoch 1 step 0" in msg
    assert "weak patients [" in msg and "last good checkpoint" in msg
    after = load_checkpoint(run / "checkpoints" / "last.pt")
    assert after["epoch"] == before["epoch"]
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k])


def test_two_processes_cannot_write_one_run(one_epoch_run, tmp_path: Path) -> None:
    run, weak, strong = one_epoch_run
    with run_lock(run):  # as if another training were writing it
        (run / ".lock").write_text("12345")
        with pytest.raises(LymphdxError, match=r"another lymphdx process \(pid 12345\)"):
            train(tiny_config(tmp_path, training={"epochs": 2}), run, weak, strong, resume=True)


def test_a_step_that_will_not_fit_is_refused_before_training(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lymphdx.engine import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 64 << 20)  # a 64 MiB machine
    monkeypatch.setattr(memory, "SMALL_STEP_VOXELS", 0)  # trace even tiny steps
    weak, strong = tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"
    with pytest.raises(LymphdxError) as err:
        train(tiny_config(tmp_path), tmp_path / "run", weak, strong, progress=False)
    msg = str(err.value)
    assert "needs about" in msg and "0.1 GiB is available" in msg
    assert "model.checkpointing: block" in msg and "memory_check: false" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_takes_new_settings_read_after_training_only(tmp_path: Path) -> None:
    """A preset's readout switched on while a run was interrupted: the run resumes with it
    (it is fitted after the last epoch); a setting that steers training's validation or
    propagation (``evaluation.tta_flip``) still refuses the resume."""
    from lymphdx.core.config import dump_config
    from lymphdx.engine.run_folder import open_run_dir

    run = tmp_path / "run"
    open_run_dir(tiny_config(tmp_path), run, resume=False)
    later = tiny_config(
        tmp_path,
        evaluation={"roi_readout": True, "bootstrap": 500, "operating_point": {"sensitivity": 0.9}},
    )
    open_run_dir(later, run, resume=True)
    assert (run / "config.yaml").read_text() == dump_config(later)
    flipped = {"tta_flip": not later.evaluation.tta_flip}
    with pytest.raises(LymphdxError, match=r"config differs.*evaluation.tta_flip"):
        open_run_dir(tiny_config(tmp_path, evaluation=flipped), run, resume=True)
