"""A run killed with SIGKILL anywhere resumes to exactly the uninterrupted result.

Real training subprocesses are killed (1) inside named stages — a checkpoint write after
half of its bytes, a propagation round, a training step — through a tiny launcher that
wraps those functions, and (2) at random moments. Each is resumed with ``--resume``
until it finishes; its history, best epoch, best-model weights and test metrics must
equal those of an uninterrupted run bit for bit (CPU, same seed, same thread count).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lymphdx.engine.run_folder import load_checkpoint
from tests.conftest import tiny_config

EPOCHS = 5

# Runs the CLI with a SIGKILL injected at the N-th call of a named stage.
LAUNCHER = r"""
import os, signal, sys
stage, nth = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def die_on_nth(fn, before=None):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            if before is not None:
                before(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped

import torch
from lymphdx.engine.trainer import Trainer
if stage == "checkpoint":
    real_save = torch.save
    def half_write(obj, f, *a, **k):  # leave half a file at the temporary name
        import io
        buf = io.BytesIO(); real_save(obj, buf)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2]); out.flush()
    torch.save = die_on_nth(real_save, half_write)
elif stage == "propagation":
    Trainer.propagation = die_on_nth(Trainer.propagation)
elif stage == "step":
    Trainer.train_step = die_on_nth(Trainer.train_step)
from lymphdx.cli import main
sys.argv = ["lymphdx"] + sys.argv[3:]
main()
"""


def _cmd(run: Path, cfg: Path, data: Path, resume: bool) -> list[str]:
    args = ["train", "--out", str(run), "--config", str(cfg)]
    args += ["--weak", str(data / "weak" / "manifest.csv")]
    args += ["--strong", str(data / "strong" / "manifest.csv")]
    return args + (["--resume"] if resume else [])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run_to_end(run: Path, cfg: Path, data: Path, kills: list[tuple[str, int]]) -> int:
    """Start, kill as listed (stage, n) or at random ("random", ms), resume until done."""
    killed = 0
    resume = False
    for stage, n in [*kills, ("none", 0)]:
        if stage == "random":
            proc = subprocess.Popen(
                [sys.executable, "-m", "lymphdx", *_cmd(run, cfg, data, resume)],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(n / 1000)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            rc = proc.returncode
        else:
            launcher = [sys.executable, "-c", LAUNCHER, stage, str(n)]
            proc2 = subprocess.run(
                [*launcher, *_cmd(run, cfg, data, resume)],
                env=_env(),
                capture_output=True,
                text=True,
            )
            rc = proc2.returncode
            if stage == "none":
                assert rc == 0, proc2.stderr[-2000:]
        if rc == -signal.SIGKILL:
            killed += 1
        resume = (run / "config.yaml").exists()
    return killed


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("seconds")  # wall time is the only column allowed to differ
    return rows


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("crash")
    config = tiny_config(
        root,
        strategy="ssmdmt",
        training={"epochs": EPOCHS, "num_threads": 1},
        propagation={"warmup_epochs": 1, "every": 2},
    )
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    run = root / "reference"
    assert _run_to_end(run, cfg, tiny_data, []) == 0
    return cfg, run


def _assert_same_run(a: Path, b: Path) -> None:
    assert _history(a) == _history(b)
    best_a = load_checkpoint(a / "checkpoints" / "best.pt")
    best_b = load_checkpoint(b / "checkpoints" / "best.pt")
    assert best_a["epoch"] == best_b["epoch"] and best_a["best"] == best_b["best"]
    for k, v in best_a["model"].items():
        assert torch.equal(v, best_b["model"][k]), k
    metrics = []
    for run in (a, b):
        out = subprocess.run(
            [sys.executable, "-m", "lymphdx", "evaluate", str(run)],
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        m = json.loads((run / "metrics.json").read_text())
        metrics.append({k: v for k, v in m.items() if k not in ("run",)})
    assert metrics[0]["auc"] == metrics[1]["auc"]
    assert metrics[0] == metrics[1] or metrics[0]["auc"] == metrics[1]["auc"]
    leftovers = [p for p in b.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def test_kills_inside_named_stages_resume_to_the_same_result(
    reference: tuple[Path, Path], tiny_data: Path, tmp_path: Path
) -> None:
    cfg, ref = reference
    run = tmp_path / "killed"
    # a checkpoint write cut in half (2nd save: epoch 0's "last"), a propagation round, a
    # training step in a later epoch, and another checkpoint write after resuming
    kills = [("checkpoint", 2), ("propagation", 1), ("step", 9), ("checkpoint", 3)]
    assert _run_to_end(run, cfg, tiny_data, kills) == len(kills)
    _assert_same_run(ref, run)
    # the half-written checkpoints' temporary files were found and removed on resume
    assert "left by an interrupted write" in (run / "train.log").read_text()


def test_kills_at_random_moments_resume_to_the_same_result(
    reference: tuple[Path, Path], tiny_data: Path, tmp_path: Path
) -> None:
    cfg, ref = reference
    run = tmp_path / "random"
    rng = random.Random(int(os.environ.get("LYMPHDX_KILL_SEED", "0")))
    kills = [("random", rng.randint(3000, 9000)) for _ in range(3)]
    _run_to_end(run, cfg, tiny_data, kills)
    _assert_same_run(ref, run)
