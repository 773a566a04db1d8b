"""Paths that cannot be reached (issue 28, item 4): a loop of symbolic links (``a -> b ->
a``, ``a -> a``), a dangling link and a missing path are told apart, for every kind of
path the command line takes (scan, DICOM folder, manifest and its cells, run folder,
output folder, config, TCIA root), through ``core.files.path_problem``.

Each refusal is checked for exit status 2 and one ``lymphdx: error:`` line that names the
path and says which of the three it is; the kernel's own verdict (``os.stat``'s errno) is
the independent check of what each fixture is.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lymphdx.core.files import folder_problem, path_problem
from tests.conftest import tiny_config
from tests.helpers import cli, make_dicom_series, one_error, write_csv
from tests.test_bad_input import manifests

LINKS = ("loop", "self_loop", "dangling", "missing")


def bad_path(folder: Path, link: str, name: str = "x.nii.gz") -> tuple[Path, tuple[str, ...]]:
    """``folder/name`` made a ``link`` of its kind; returns it and the words its error must
    hold. The kernel's errno confirms the kind independently of lymphdx."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if link == "loop":
        other = folder / f"other-{name}"
        path.symlink_to(other)
        other.symlink_to(path)
        words: tuple[str, ...] = ("loop of symbolic links", str(path), str(other))
        expected = errno.ELOOP
    elif link == "self_loop":
        path.symlink_to(path)
        words, expected = ("loop of symbolic links", str(path)), errno.ELOOP
    elif link == "dangling":
        target = folder / f"gone-{name}"
        path.symlink_to(target)
        words = ("a symbolic link to", str(target), "which does not exist")
        expected = errno.ENOENT
    else:
        words, expected = ("does not exist",), errno.ENOENT
    with pytest.raises(OSError) as err:
        os.stat(path)
    assert err.value.errno == expected
    return path, words


def check_error(code: int, output: str, path: Path, link: str, words: tuple[str, ...]) -> None:
    line = one_error(code, output, str(path), *words)
    if link == "missing":
        assert "symbolic" not in line, line
    else:
        assert "does not exist" not in line or link == "dangling", line


# --------------------------------------------------------------------------- the helper


def test_path_problem_tells_the_kinds_apart(tmp_path: Path) -> None:
    assert path_problem(tmp_path) is None
    (tmp_path / "f").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "to_real").symlink_to(tmp_path / "real")
    assert path_problem(tmp_path / "f") is None
    assert path_problem(tmp_path / "to_real") is None  # a working link is fine
    for link in LINKS:
        path, words = bad_path(tmp_path / link, link)
        problem = path_problem(path) or ""
        for word in words:
            if word != str(path) or link.endswith("loop"):
                assert word in problem, (link, problem)
    # a chain: the error follows it to the missing end
    (tmp_path / "c1").symlink_to(tmp_path / "c2")
    (tmp_path / "c2").symlink_to(tmp_path / "c3")
    assert path_problem(tmp_path / "c1") == (
        f"is a symbolic link to {str(tmp_path / 'c2')!r} -> {str(tmp_path / 'c3')!r}, "
        "which does not exist"
    )
    # the name that cannot be reached lies above the path
    loop = tmp_path / "loop" / "x.nii.gz"
    assert path_problem(loop / "deeper.nii.gz") == (
        f"lies in {str(loop)!r}, which is a loop of symbolic links "
        f"({str(loop)!r} -> {str(tmp_path / 'loop' / 'other-x.nii.gz')!r} -> {str(loop)!r})"
    )
    assert path_problem(tmp_path / "f" / "x") == (
        f"lies in {str(tmp_path / 'f')!r}, which is a file, not a folder"
    )
    assert path_problem(tmp_path / "nope" / "x") == "does not exist"


def test_folder_problem_names_the_loop(tmp_path: Path) -> None:
    path, _ = bad_path(tmp_path, "loop", "out")
    assert folder_problem(path) == f"it {path_problem(path)}"
    assert folder_problem(path / "sub") == f"{str(path)!r} above it {path_problem(path)}"
    dangling, _ = bad_path(tmp_path, "dangling", "out2")
    assert "which does not exist" in (folder_problem(dangling) or "")


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Weak and strong manifests of small real volumes, and a tiny config file."""
    import yaml

    tmp = tmp_path_factory.mktemp("links_data")
    weak, strong = manifests(tmp)
    config = tiny_config(tmp, training={"epochs": 1}).model_dump(mode="json")
    config.pop("manifests")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    return weak, strong, tmp / "tiny.yaml"


@pytest.fixture(scope="module")
def run(data: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch supervised run on six small scans (seconds)."""
    from lymphdx.engine.train import train

    tmp = tmp_path_factory.mktemp("links_run")
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1})
    train(config, tmp / "run", data[0], data[1], progress=False)
    return tmp / "run"


Case = tuple[list[object], Path, tuple[str, ...]]  # arguments, the bad path, its words


def case_scan(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link)
    return ["predict", "--model", run, path, "--out", tmp / "o"], path, words


def case_dicom_folder(data, run, tmp: Path, link: str) -> Case:
    """A DICOM series folder given by a link: one scan, like a file."""
    path, words = bad_path(tmp, link, "series")
    return ["predict", "--model", run, path, "--out", tmp / "o"], path, words


def case_scan_in_folder(data, run, tmp: Path, link: str) -> Case:
    """A folder of scans: a broken link named like a scan is reported, not skipped."""
    path, words = bad_path(tmp / "scans", link)
    return ["predict", "--model", run, tmp / "scans", "--out", tmp / "o"], path, words


def case_predict_manifest(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "scans.csv")
    return ["predict", "--model", run, "--manifest", path, "--out", tmp / "o"], path, words


def case_model(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "run")
    scan = data[0].parent / "w0.nii.gz"
    return ["predict", "--model", path, scan, "--out", tmp / "o"], path, words


def case_evaluate_run(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "run")
    return ["evaluate", path], path, words


def case_report_folder(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "run")
    return ["report", path], path, words


def case_resume_run(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "run")
    return ["train", "--weak", data[0], "--strong", data[1], "--out", path, "--resume"], path, words


def case_weak_manifest(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "weak.csv")
    args = ["train", "--weak", path, "--strong", data[1], "--config", data[2]]
    return [*args, "--out", tmp / "o"], path, words


def case_strong_manifest(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "strong.csv")
    args = ["compare", "--weak", data[0], "--strong", path, "--config", data[2]]
    return [*args, "--out", tmp / "o"], path, words


def _manifest_cell(data, tmp: Path, link: str, column: str) -> Case:
    """``train`` with a copy of the weak (``image``) or strong (``mask``) manifest whose
    first row's ``column`` cell is a bad path."""
    weak, strong, config = data
    source = weak if column == "image" else strong
    lines = source.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    rows = [[str(source.parent / c) if c.endswith(".nii.gz") else c for c in r] for r in rows]
    path, words = bad_path(tmp / "files", link)
    rows[0][header.index(column)] = str(path)
    copy = write_csv(tmp / "m.csv", header, rows)
    weak, strong = (copy, strong) if column == "image" else (weak, copy)
    args = ["train", "--weak", weak, "--strong", strong, "--config", config, "--out", tmp / "o"]
    return args, path, words


def case_manifest_image(data, run, tmp: Path, link: str) -> Case:
    return _manifest_cell(data, tmp, link, "image")


def case_manifest_mask(data, run, tmp: Path, link: str) -> Case:
    return _manifest_cell(data, tmp, link, "mask")


def case_config(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "c.yaml")
    args = ["train", "--weak", data[0], "--strong", data[1], "--config", path]
    return [*args, "--out", tmp / "o"], path, words


def case_tcia_root(data, run, tmp: Path, link: str) -> Case:
    path, words = bad_path(tmp, link, "tcia")
    return ["prepare-tcia", "--root", path, "--out", tmp / "o" / "s.csv"], path, words


CASES: dict[str, Callable[..., Case]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}


@pytest.mark.parametrize(
    ("kind", "link"),
    # a missing scan is no entry of a folder of scans
    [(k, x) for k in sorted(CASES) for x in LINKS if (k, x) != ("scan_in_folder", "missing")],
)
def test_unreachable_input_is_named(kind, link, data, run, tmp_path) -> None:
    args, path, words = CASES[kind](data, run, tmp_path, link)
    code, output = cli(*args)
    check_error(code, output, path, link, words)
    assert not (tmp_path / "o").exists(), "nothing is written for a refused input"


@pytest.mark.parametrize("link", ["loop", "self_loop", "dangling"])
@pytest.mark.parametrize("command", ["predict", "train", "compare", "synth"])
def test_output_folder_that_is_a_bad_link(command, link, data, run, tmp_path) -> None:
    out, words = bad_path(tmp_path, link, "out")
    args = {
        "predict": ["predict", "--model", run, data[0].parent / "w0.nii.gz"],
        "train": ["train", "--weak", data[0], "--strong", data[1], "--config", data[2]],
        "compare": ["compare", "--weak", data[0], "--strong", data[1], "--config", data[2]],
        "synth": ["synth", "--n-weak", 2, "--n-strong", 1],
    }[command]
    code, output = cli(*args, "--out", out)
    check_error(code, output, out, link, words)
    assert os.path.islink(out), "the link is left as it was"


def test_dicom_series_behind_a_working_link_is_read(tmp_path) -> None:
    """The checks refuse only what cannot be reached: a link to a real series is read."""
    from lymphdx.io.volumes import read_volume

    folder, stored, _ = make_dicom_series(tmp_path / "series")
    (tmp_path / "link").symlink_to(folder)
    volume = read_volume(tmp_path / "link")
    assert volume.array.shape == stored.shape
    shutil.rmtree(folder)  # now dangling: named as such
    with pytest.raises(Exception, match="symbolic link to .*series.*which does not exist"):
        read_volume(tmp_path / "link")
