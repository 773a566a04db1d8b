"""Bad command-line input (issue 14, items 3, 5 and 6): out-of-range seeds and counts,
options blamed on the wrong source, output paths that are files, ``--resume`` of nothing,
a cache path that is a file, ``metrics.json`` with NaN, numpy warnings in ``evaluate``,
``--help``/``--version``.

Each refusal is checked for exit status 2, one ``lymphdx: error:`` line that names the
option, key or file, and no output left behind.
"""

from __future__ import annotations

import csv
import json
import math
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from lymphdx import __version__
from lymphdx.core.files import dumps_json, folder_problem, write_json
from lymphdx.data.synthetic import SynthSpec, default_n_pos
from tests.conftest import tiny_config
from tests.helpers import cli, one_error


def config_yaml(tmp: Path, cache: bool = True, **extra: object) -> Path:
    """The tiny test config as a YAML file (no manifests), plus ``extra`` top-level keys."""
    data = tiny_config(tmp, training={"epochs": 1}).model_dump(mode="json")
    data.pop("manifests")
    if not cache:
        data["data"].pop("cache_dir")
    for key, value in extra.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def manifests(tmp: Path, tiny_data: Path) -> tuple[Path, Path]:
    """Six weak scans of ``tiny_data`` with a split column (one positive and one negative
    in each split) and two strong scans."""
    with (tiny_data / "weak" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    pos = [r for r in rows if r["label"] == "1"][:3]
    neg = [r for r in rows if r["label"] == "0"][:3]
    weak = tmp / "weak.csv"
    with weak.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "image", "label", "split"])
        for split, p, n in zip(("train", "val", "test"), pos, neg, strict=True):
            for r in (p, n):
                w.writerow([r["patient_id"], tiny_data / "weak" / r["image"], r["label"], split])
    strong = tmp / "strong.csv"
    with (tiny_data / "strong" / "manifest.csv").open() as f:
        srows = list(csv.DictReader(f))[:2]
    with strong.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "image", "mask"])
        for r in srows:
            w.writerow(
                [
                    r["patient_id"],
                    tiny_data / "strong" / r["image"],
                    tiny_data / "strong" / r["mask"],
                ]
            )
    return weak, strong


@pytest.fixture(scope="module")
def data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return manifests(tmp_path_factory.mktemp("cli_manifests"), tiny_data)


@pytest.fixture(scope="module")
def tiny_run(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One supervised epoch; its test split holds one positive and one negative."""
    from lymphdx.engine.train import train

    tmp = tmp_path_factory.mktemp("cli_run")
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1})
    train(config, tmp / "run", *data, progress=False)
    return tmp / "run"


def train_args(data: tuple[Path, Path], out: Path, config: Path) -> list[object]:
    return ["train", "--weak", data[0], "--strong", data[1], "--out", out, "--config", config]


# --------------------------------------------------------------------------- item 3: seeds


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999999999999])
def test_train_seed_out_of_range(data, tmp_path, seed):
    out = tmp_path / "run"
    code, output = cli(*train_args(data, out, config_yaml(tmp_path)), "--seed", seed)
    one_error(code, output, "--seed", str(seed), "2**32")
    assert not out.exists()


def test_train_largest_seed_is_accepted_by_the_check(data, tmp_path):
    """2**32 - 1 passes the seed check (the run is then refused for its epochs)."""
    out = tmp_path / "run"
    args = train_args(data, out, config_yaml(tmp_path))
    code, output = cli(*args, "--seed", 2**32 - 1, "--epochs", 0)
    one_error(code, output, "--epochs")
    assert "--seed" not in output
    assert not out.exists()


def test_synth_negative_seed_leaves_no_folder(tmp_path):
    out = tmp_path / "d"
    code, output = cli("synth", "--out", out, "--n-weak", 2, "--n-strong", 1, "--seed", -5)
    one_error(code, output, "--seed", "-5")
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "key"),
    [({"data": {"split_seed": -1}}, "data.split_seed"), ({"seed": -1}, "seed")],
    ids=["split_seed", "seed"],
)
def test_config_seed_out_of_range_names_the_key(data, tmp_path, extra, key):
    config = config_yaml(tmp_path, **extra)
    out = tmp_path / "run"
    code, output = cli(*train_args(data, out, config))
    one_error(code, output, str(config), f"'{key}'")
    assert not out.exists()


def test_synth_spec_refuses_a_bad_seed_before_writing(tmp_path):
    from lymphdx.data.synthetic import write_synthetic

    with pytest.raises(ValueError, match="seed"):
        write_synthetic(tmp_path / "d", SynthSpec(n_weak=2, n_strong=1, seed=-5))
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- item 5: vague errors


@pytest.mark.parametrize("epochs", [-1, 0])
def test_train_epochs_blamed_on_the_command_line(data, tmp_path, epochs):
    config = config_yaml(tmp_path)
    out = tmp_path / "run"
    code, output = cli(*train_args(data, out, config), "--epochs", epochs)
    line = one_error(code, output, "--epochs", str(epochs))
    assert str(config) not in line and "preset" not in line
    assert not out.exists()


@pytest.mark.parametrize("option", ["--epochs", "--seeds", "--repeats"])
def test_compare_counts_blamed_on_the_command_line(data, tmp_path, option):
    out = tmp_path / "cmp"
    args = ["compare", "--weak", data[0], "--strong", data[1], "--out", out]
    code, output = cli(*args, "--config", config_yaml(tmp_path), option, 0)
    one_error(code, output, option)
    assert not out.exists()


@pytest.mark.parametrize("effect", ["0", "-0.05", "0.49", "0.7"])
def test_compare_effect_out_of_range_blamed_on_the_command_line(data, tmp_path, effect):
    out = tmp_path / "cmp"
    args = ["compare", "--weak", data[0], "--strong", data[1], "--out", out]
    code, output = cli(*args, "--config", config_yaml(tmp_path), "--effect", effect)
    line = one_error(code, output, "--effect", "0.49")
    assert "preset" not in line
    assert not out.exists()


@pytest.mark.parametrize("effect", [0, 0.49, 0.5])
def test_config_declared_effect_out_of_range_names_the_key(data, tmp_path, effect):
    config = config_yaml(tmp_path, evaluation={"declared_effect": effect})
    out = tmp_path / "cmp"
    code, output = cli(
        "compare", "--weak", data[0], "--strong", data[1], "--out", out, "--config", config
    )
    one_error(code, output, str(config), "'evaluation.declared_effect'")
    assert not out.exists()


def test_demo_seeds_zero(tmp_path):
    out = tmp_path / "demo"
    code, output = cli("demo", "--out", out, "--seeds", 0)
    one_error(code, output, "--seeds")
    assert not out.exists()


def test_train_out_is_a_file(data, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("not a run")
    code, output = cli(*train_args(data, out, config_yaml(tmp_path)))
    one_error(code, output, "--out", str(out), "is a file")
    assert out.read_text() == "not a run"
    code, output = cli(*train_args(data, out / "run", config_yaml(tmp_path)))
    one_error(code, output, "--out", str(out), "above it is a file")
    assert out.read_text() == "not a run"


@pytest.mark.parametrize("command", ["synth", "compare", "demo"])
def test_other_out_options_are_files(data, tmp_path, command):
    out = tmp_path / "a_file"
    out.write_text("x")
    args = {
        "synth": ["synth", "--out", out, "--n-weak", 2, "--n-strong", 1],
        "compare": ["compare", "--weak", data[0], "--strong", data[1], "--out", out],
        "demo": ["demo", "--out", out],
    }[command]
    code, output = cli(*args)
    one_error(code, output, "--out", str(out), "is a file")
    assert out.read_text() == "x"


def test_resume_a_missing_folder(tmp_path):
    out = tmp_path / "nothing"
    code, output = cli("train", "--out", out, "--resume")
    line = one_error(code, output, "--resume", str(out), "does not exist")
    assert "--weak" not in line
    assert not out.exists()


def test_resume_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    code, output = cli("train", "--out", out, "--resume")
    one_error(code, output, "--resume", str(out), "holds no run")
    assert list(out.iterdir()) == []


def test_cache_env_is_a_file(data, tmp_path):
    cache = tmp_path / "cache_file"
    cache.write_text("x")
    out = tmp_path / "run"
    args = train_args(data, out, config_yaml(tmp_path, cache=False))
    code, output = cli(*args, env={"LYMPHDX_CACHE": str(cache)})
    one_error(code, output, "LYMPHDX_CACHE", str(cache), "is a file")
    assert not out.exists()
    assert cache.read_text() == "x"


def test_cache_key_below_a_file(data, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    config = config_yaml(tmp_path, data={"cache_dir": str(blocker / "cache")})
    out = tmp_path / "run"
    code, output = cli(*train_args(data, out, config))
    one_error(code, output, "data.cache_dir", str(blocker), "above it is a file")
    assert not out.exists()


def test_folder_problem(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert folder_problem(tmp_path / "f") == "it is a file, not a folder"
    assert "above it is a file" in (folder_problem(tmp_path / "f" / "x") or "")
    assert "symbolic link" in (folder_problem(tmp_path / "loop") or "")


def test_os_error_below_a_file_is_explained(tmp_path, capsys):
    """A bare "Not a directory" from deep inside (a folder made below a file) becomes a
    line that names the file in the way."""
    import typer

    from lymphdx.cli import _friendly

    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" / "sub" / ".tmp-0123abcd-out"

    @_friendly
    def fails() -> None:
        raise NotADirectoryError(20, "Not a directory", str(target))

    with pytest.raises(typer.Exit) as exit_info:
        fails()
    assert exit_info.value.exit_code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("lymphdx: error: cannot make the folder"), line
    assert str(tmp_path / "f" / "sub" / "out") in line and ".tmp-" not in line
    assert f"{str(tmp_path / 'f')!r} above it is a file" in line


# --------------------------------------------------------------------------- item 6: small things


def test_synth_n_pos_follows_the_paper_prevalence(tmp_path):
    assert SynthSpec().n_pos == 57
    assert SynthSpec(n_weak=12).n_pos == default_n_pos(12) == 6
    assert SynthSpec(n_weak=0).n_pos == 0
    assert SynthSpec(n_weak=12, n_pos=0).n_pos == 0
    out = tmp_path / "d"
    code, output = cli("synth", "--out", out, "--n-weak", 12, "--n-strong", 1)
    assert code == 0, output
    with (out / "weak" / "manifest.csv").open() as f:
        labels = [int(r["label"]) for r in csv.DictReader(f)]
    assert len(labels) == 12 and sum(labels) == 6


def test_synth_explicit_n_pos_out_of_range(tmp_path):
    out = tmp_path / "d"
    code, output = cli("synth", "--out", out, "--n-weak", 12, "--n-pos", 13)
    one_error(code, output, "--n-pos", "13", "--n-weak")
    assert not out.exists()


def test_default_split_too_small_says_what_to_set(tiny_data, data, tmp_path):
    """12 weak patients, no split column: the default 90/10/23 split gives val 1 patient;
    the error says from how many patients it works and what to set instead."""
    with (tiny_data / "weak" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))[:12]
    weak = tmp_path / "weak12.csv"
    with weak.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "image", "label"])
        for r in rows:
            w.writerow([r["patient_id"], tiny_data / "weak" / r["image"], r["label"]])
    out = tmp_path / "run"
    args = ["train", "--weak", weak, "--strong", data[1], "--out", out]
    code, output = cli(*args, "--config", config_yaml(tmp_path))
    one_error(
        code, output, str(weak), "21 weak patients", "about 40", "data.split.weak", "split column"
    )
    assert not out.exists()


def _strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_writes_null_not_nan_and_no_numpy_warnings(tiny_run):
    (tiny_run / "metrics.json").unlink(missing_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, output = cli("evaluate", tiny_run)
    assert code == 0, output
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [
        str(w.message) for w in caught
    ]
    assert "Warning" not in output
    metrics = _strict_json((tiny_run / "metrics.json").read_text())
    assert isinstance(metrics, dict)
    assert metrics["n"] == 2 and metrics["n_pos"] == 1
    assert metrics["auc_se_delong"] is None  # one patient per class: undefined
    printed = output[output.index("{") : output.rindex("}") + 1]
    assert _strict_json(printed) == metrics


def test_write_json_writes_null_for_non_finite_numbers(tmp_path):
    obj = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": (math.nan, 2)}, "e": "NaN"}
    write_json(tmp_path / "x.json", obj)
    assert _strict_json((tmp_path / "x.json").read_text()) == {
        "a": None,
        "b": [1.0, None, None],
        "c": {"d": [None, 2]},
        "e": "NaN",
    }
    assert _strict_json(dumps_json(obj)) == _strict_json((tmp_path / "x.json").read_text())


@pytest.mark.parametrize(
    "args", [[], ["train"], ["evaluate"], ["predict"], ["compare"], ["synth"], ["demo"]]
)
def test_help_shows_flags_without_a_value(args):
    code, output = cli(*args, "--help")
    assert code == 0, output
    assert "<bool>" not in output, output
    assert "--help" in output


def test_help_lists_the_choices():
    _, output = cli("evaluate", "--help")
    assert "train|val|test" in output, output
    _, output = cli("predict", "--help")
    assert "weak|strong" in output, output
    _, output = cli("train", "--help")
    assert "quick|paper" in output and "ssmdmt-plus" in output, output


@pytest.mark.parametrize(
    "args",
    [["evaluate", "run", "--split", "tset"], ["predict", "s.nii", "--model", "m", "--out", "o"]],
)
def test_a_choice_outside_the_list_is_refused(args, tmp_path):
    if args[0] == "predict":
        args = [*args, "--domain", "hospital"]
    code, output = cli(*args)
    assert code == 2, output
    assert "Traceback" not in output
    assert ("--split" if args[0] == "evaluate" else "--domain") in output


def test_cli_choices_are_lymphdx_choices():
    from lymphdx import cli as cli_module
    from lymphdx.core.config import PRESETS, STRATEGIES
    from lymphdx.data.manifest import SPLITS
    from lymphdx.io.tcia import REGIONS
    from lymphdx.workflows.export import FORMATS

    assert typing.get_args(cli_module.Split) == tuple(SPLITS)
    assert typing.get_args(cli_module.Strategy) == tuple(STRATEGIES)
    assert typing.get_args(cli_module.Preset) == tuple(PRESETS)
    assert set(typing.get_args(cli_module.Region)) == set(REGIONS)
    assert typing.get_args(cli_module.Domain) == ("weak", "strong")
    assert typing.get_args(cli_module.ExportFormat) == FORMATS


def test_version():
    code, output = cli("--version")
    assert code == 0, output
    assert output.strip() == f"lymphdx {__version__}"


@pytest.mark.parametrize(
    ("weak", "problem"),
    [([0, 0, 0], "positive share"), ([90, -10, 23], ">= 0")],
)
def test_split_proportions_name_the_key(tmp_path: Path, weak: list[int], problem: str) -> None:
    from lymphdx.core.config import load_config
    from lymphdx.core.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"data\.split\.weak.*{re.escape(problem)}"):
        load_config(overrides={"data": {"split": {"weak": weak}}})
