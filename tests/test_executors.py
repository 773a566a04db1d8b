"""``compare --executor local|ray|slurm``, ``--plan`` and ``--collect`` (issue 31.1) on a
cross-validated compare of 2 strategies × 2 folds on the tiny data: Ray on a local Ray of
2 CPUs and SLURM through submitit's local executor give the local table to the digit; a
failing run is reported with its log's end while the others finish; an interrupted run
resumes; the lines of ``--plan`` run as they are and ``--collect`` builds the same table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.config import Config, load_config
from lymphdx.core.config_compare import slurm_minutes
from lymphdx.core.errors import LymphdxError
from lymphdx.engine.trainer import Trainer
from lymphdx.workflows.compare import compare, finished
from lymphdx.workflows.executors import RayExecutor, RunsFailed, SlurmExecutor
from tests.conftest import tiny_config

runner = CliRunner()
STRATEGIES = ["supervised", "multitask"]
REPO = Path(__file__).resolve().parents[1]
TABLE = ("results.md", "test_predictions.csv")  # the table and the pooled predictions


def _manifests(data: Path) -> tuple[Path, Path]:
    return data / "weak" / "manifest.csv", data / "strong" / "manifest.csv"


def _run(out: Path, fold: int, strategy: str) -> Path:
    return out / "cv" / "repeat0" / f"fold{fold}" / strategy / "seed0"


@pytest.fixture(scope="module")
def setup(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The config as a YAML file (as the command line reads it; 2 epochs, one thread per
    run, so a run's numbers do not depend on where it ran) and the local executor's
    compare of 2 strategies × 2 folds: the reference."""
    root = tmp_path_factory.mktemp("executors")
    data = tiny_config(root, training={"epochs": 2, "num_threads": 1}).model_dump(mode="json")
    data.pop("manifests")
    data["compare"] = {"ray": {"cpus": 2}, "slurm": {"cluster": "local", "time": "15"}}
    config_yaml = root / "tiny.yaml"
    config_yaml.write_text(yaml.safe_dump(data))
    config = load_config(config_yaml)
    weak, strong = _manifests(tiny_data)
    compare(config, weak, strong, root / "local", STRATEGIES, [0], False, cv=2)
    return {"root": root, "config": config, "yaml": config_yaml, "weak": weak, "strong": strong}


def _compare(setup: dict, out: Path, executor: object = None) -> dict:
    return compare(
        setup["config"],
        setup["weak"],
        setup["strong"],
        out,
        STRATEGIES,
        [0],
        False,
        cv=2,
        executor=executor,
    )


def _same_table(setup: dict, out: Path) -> None:
    for name in TABLE:
        assert (out / name).read_text() == (setup["root"] / "local" / name).read_text(), name


def test_ray_on_two_cpus_gives_the_local_table_and_reports_a_failed_run(setup: dict) -> None:
    """One run's fold file is broken: that run fails, the other three finish on Ray, and
    compare names the run, its error and its log's end, and writes no table. Fixed, the
    same compare trains only that run, and the table is the local one to the digit."""
    config: Config = setup["config"]
    out = setup["root"] / "ray"
    broken = _run(out, 1, "multitask")
    broken.mkdir(parents=True)
    splits = (_run(setup["root"] / "local", 1, "multitask") / "splits.csv").read_text()
    (broken / "splits.csv").write_text(splits.replace(",train,", ",trian,", 1))
    with pytest.raises(RunsFailed) as failed:
        _compare(setup, out, RayExecutor(config.compare))
    message = str(failed.value)
    assert message.startswith("1 of 4 runs failed")
    assert "cv repeat 0 fold 1: multitask seed 0" in message and str(broken) in message
    assert "unknown split 'trian'" in message
    assert "its log ends:" in message and "rank 0 of 1" in message  # the run's own log
    [outcome] = failed.value.failed
    assert not outcome.ok and outcome.host and outcome.log_tail
    assert not (out / "results.md").exists()
    done = [_run(out, f, s) for f in (0, 1) for s in STRATEGIES if (f, s) != (1, "multitask")]
    assert all(finished(d) for d in done)
    weights = {d: (d / "checkpoints" / "best.pt").stat().st_mtime_ns for d in done}

    # a run refused before its first epoch leaves nothing behind (train's remove_new_run),
    # so the same compare writes the fold's splits.csv again: the cause is gone
    assert not (broken / "splits.csv").exists()
    _compare(setup, out, RayExecutor(config.compare))
    _same_table(setup, out)
    assert {d: (d / "checkpoints" / "best.pt").stat().st_mtime_ns for d in done} == weights


def test_slurm_job_array_resumes_an_interrupted_run_and_gives_the_local_table(
    setup: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run interrupted after its first epoch (its worker gone: a checkpoint, no
    metrics) is resumed by the job array from that epoch, not retrained; submitit's local
    executor runs the array as processes, as SLURM would on nodes."""
    out = setup["root"] / "slurm"
    first = _run(out, 0, "supervised")
    train_epoch = Trainer.train_epoch

    def killed_after_one_epoch(self: Trainer) -> dict[str, float]:
        if self.epoch == 1:
            raise KeyboardInterrupt  # as a worker that stops dead after an epoch
        return train_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        _compare(setup, out)  # the local executor: the first run, in this process
    monkeypatch.undo()
    assert (first / "checkpoints" / "last.pt").exists() and not finished(first)
    assert len((first / "history.csv").read_text().splitlines()) == 2  # header + epoch 1

    executor = SlurmExecutor(setup["config"].compare, out / "slurm")
    _compare(setup, out, executor)
    _same_table(setup, out)
    assert f"resumed {first} at epoch 1" in (first / "train.log").read_text()
    assert any((out / "slurm").glob("*/*_log.out"))  # the jobs' logs


def test_plan_lines_run_as_they_are_and_collect_builds_the_same_table(
    setup: dict, tmp_path: Path
) -> None:
    """Three runs finished, one not: --plan writes one line, for that run; --collect
    refuses, naming it; the line, run by a shell, trains and scores it; --collect then
    builds the local table."""
    out = tmp_path / "planned"
    shutil.copytree(setup["root"] / "local" / "cv", out / "cv")
    todo = _run(out, 1, "supervised")
    shutil.rmtree(todo)
    args = ["compare", "--weak", str(setup["weak"]), "--strong", str(setup["strong"])]
    args += ["--out", str(out), "--cv", "2", "--seeds", "1", "--config", str(setup["yaml"])]
    for s in STRATEGIES:
        args += ["--strategies", s]
    plan = tmp_path / "plan.txt"
    result = runner.invoke(app, [*args, "--plan", str(plan)])
    assert result.exit_code == 0, result.output
    [line] = plan.read_text().splitlines()
    assert line == f"lymphdx train --out {todo} --resume && lymphdx evaluate {todo}"
    assert (todo / "config.yaml").exists() and (todo / "splits.csv").exists()

    refused = runner.invoke(app, [*args, "--collect"])
    assert refused.exit_code == 2
    assert "1 run(s) have not finished" in refused.output and str(todo) in refused.output

    bin_dir = str(Path(sys.executable).parent)  # where the lymphdx script is installed
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}"
    subprocess.run(["bash", "-c", line], check=True, env=env, capture_output=True)
    assert finished(todo)

    result = runner.invoke(app, [*args, "--collect"])
    assert result.exit_code == 0, result.output
    _same_table(setup, out)


def test_plan_to_stdout_lists_every_unfinished_run(setup: dict, tmp_path: Path) -> None:
    """``--plan -``: stdout holds the commands alone (one per run, longest first is not
    needed: a scheduler orders them), what was written goes to stderr."""
    args = ["compare", "--weak", str(setup["weak"]), "--strong", str(setup["strong"])]
    args += ["--out", str(tmp_path / "o"), "--cv", "2", "--seeds", "1"]
    args += ["--config", str(setup["yaml"]), "--strategies", "supervised", "--plan", "-"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(" train --out " in x and " --resume && " in x for x in lines)
    assert "2 run(s) to train" in result.stderr


def test_a_missing_extra_names_it(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "submitit", None)
    compare_settings = setup["config"].compare
    with pytest.raises(LymphdxError, match=r"pip install 'lymphdx\[ray\]'"):
        RayExecutor(compare_settings).run([], False)
    with pytest.raises(LymphdxError, match=r"pip install 'lymphdx\[slurm\]'"):
        SlurmExecutor(compare_settings, Path("unused")).run([], False)


def test_slurm_without_sbatch_says_what_to_do(setup: dict) -> None:
    if shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    settings = setup["config"].compare.model_copy(
        update={"slurm": setup["config"].compare.slurm.model_copy(update={"cluster": "slurm"})}
    )
    with pytest.raises(LymphdxError, match="found no sbatch"):
        SlurmExecutor(settings, Path("unused")).run([], False)


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("4:00:00", 240), ("1:30", 2), ("1-12", 2160), ("2-00:00:01", 2881)],
)
def test_slurm_times_in_minutes_as_sbatch_reads_them(text: str, minutes: int) -> None:
    # sbatch --time: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S"; rounded up to minutes
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--executor", "ray", "--jobs", "2"], "--jobs is the local executor's"),
        (["--plan", "-", "--collect"], "--plan or --collect, not both"),
        (["--executor", "slurm", "--time", "soon"], "--time: 'soon' is not a SLURM time"),
        (["--executor", "slurm", "--gpus-per-run", "0.5"], "SLURM gives whole GPUs"),
        (["--executor", "pbs"], "Invalid value"),
        (["--plan", "-", "--executor", "ray"], "--plan and --collect train nothing"),
        (["--ablation", "--executor", "slurm"], "--ablation trains its arms on this machine"),
    ],
)
def test_contradicting_options_are_refused_before_anything_is_written(
    setup: dict, tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "never"
    args = ["compare", "--weak", str(setup["weak"]), "--strong", str(setup["strong"])]
    result = runner.invoke(app, [*args, "--out", str(out), *extra])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not out.exists()
