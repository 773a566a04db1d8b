"""Advice that can be followed (issue 28, item 7).

* A DICOM folder that holds several series: the error lists them (UID, description,
  slices) and names ``lymphdx predict --series-uid``, which reads the chosen one; an
  unknown UID lists the UIDs there.
* A weak set without both labels (every label 0, every label 1, or too few of one): the
  error asks for patients of the missing label, not for other split shares, which
  cannot help; where shares do help (both labels, each at least 3 times), the shares it
  suggests do split the set.
* A non-CT series: no advice to pass a Python argument the command line does not have.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from lymphdx.core.errors import InputError
from lymphdx.data.manifest import WeakRecord
from lymphdx.data.splits import assign_splits, check_weak_splits
from tests.conftest import tiny_config
from tests.helpers import cli, one_error, write_csv, write_ct_series
from tests.test_bad_input import manifests

# --------------------------------------------------------------------------- --series-uid


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch supervised run on six small scans (seconds)."""
    from lymphdx.engine.train import train

    tmp = tmp_path_factory.mktemp("advice_run")
    weak, strong = manifests(tmp)
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1})
    train(config, tmp / "run", weak, strong, progress=False)
    return tmp / "run"


def _describe(folder: Path, prefix: str, description: str) -> None:
    """Give the files ``prefix*`` of ``folder`` a SeriesDescription (pydicom)."""
    for path in folder.glob(f"{prefix}*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = description
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def two_series(tmp_path: Path):
    """One folder holding an axial CT of 7 slices ("soft tissue") and one of 5 ("lung"),
    at different positions."""
    folder = tmp_path / "study"
    first = write_ct_series(folder, 7, step=3.0, name_prefix="a", series_number=2)
    second = write_ct_series(
        folder, 5, step=4.0, origin=(-150.0, -170.0, -40.0), name_prefix="b", series_number=3
    )
    _describe(folder, "a", "soft tissue")
    _describe(folder, "b", "lung")
    return folder, first, second


def test_a_folder_of_two_series_is_refused_with_the_series_and_the_option(
    run, two_series, tmp_path
):
    folder, first, second = two_series
    code, output = cli("predict", "--model", run, folder, "--out", tmp_path / "out")
    line = one_error(code, output, str(folder), "2 DICOM series", "--series-uid")
    for series, description, n in ((first, "soft tissue", 7), (second, "lung", 5)):
        assert re.search(
            rf"{re.escape(series.series_uid)} \(CT, axial, {n} slices, '{description}'\)", line
        ), line
    assert not (tmp_path / "out" / "study").exists()


def test_series_uid_reads_the_chosen_series(run, two_series, tmp_path):
    folder, _, second = two_series
    out = tmp_path / "out"
    code, output = cli(
        "predict", "--model", run, folder, "--out", out, "--series-uid", second.series_uid
    )
    assert code == 0, output
    # independent readers: pydicom on the chosen series' files, nibabel on the outputs
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in second.files]
    positions = np.array(sorted(h.ImagePositionPatient[2] for h in headers), float)
    image = nib.load(out / "study" / "roi_prob.nii.gz")
    assert image.shape == (128, 128, 5)  # the 5-slice series, not the 7-slice one
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    np.testing.assert_allclose(lps[2, 3], positions[0], atol=1e-3)
    np.testing.assert_allclose(lps[2, 2], 4.0, atol=1e-3)
    # the DICOM SEG references exactly the chosen series' slices
    seg = pydicom.dcmread(out / "study" / "roi_seg.dcm")
    referenced = {
        r.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for r in s.ReferencedInstanceSequence
    }
    assert referenced == {h.SOPInstanceUID for h in headers}
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {second.series_uid}
    assert json.loads((out / "study" / "prediction.json").read_text())["dicom_seg"]


def test_an_unknown_series_uid_lists_the_uids_there(run, two_series, tmp_path):
    folder, first, second = two_series
    args = ["predict", "--model", run, folder, "--out", tmp_path / "out"]
    code, output = cli(*args, "--series-uid", "1.2.3.4")
    one_error(
        code,
        output,
        str(folder),
        "1.2.3.4 is not in the folder",
        first.series_uid,
        second.series_uid,
    )


def test_series_uid_without_a_dicom_folder_is_refused(run, tmp_path):
    scan = next((run.parent / "weak").glob("*.nii.gz"))
    code, output = cli(
        "predict", "--model", run, scan, "--out", tmp_path / "out", "--series-uid", "1.2.3"
    )
    one_error(code, output, "--series-uid", "no scan given is a DICOM folder")
    assert not (tmp_path / "out").exists()


def test_a_non_ct_series_gets_no_python_only_advice(tmp_path):
    from lymphdx.io.volumes import read_volume

    mr = write_ct_series(tmp_path / "mr", 3, modality="MR")
    with pytest.raises(InputError) as err:
        read_volume(mr.folder, "P1")
    assert "not CT" in str(err.value) and "allow_non_ct" not in str(err.value)


# --------------------------------------------------------------------------- weak labels


def _split(labels: list[int], shares: list[float]) -> list[WeakRecord]:
    """The weak set of ``labels``, split by lymphdx's seeded stratified split."""
    records = [WeakRecord(f"P{i:03d}", Path(f"p{i}.nii.gz"), y) for i, y in enumerate(labels)]
    assigned = assign_splits(records, shares, 0, stratify=True)
    return [replace(r, split=assigned[r.patient_id]) for r in records]


@pytest.mark.parametrize(
    ("n0", "n1", "words"),
    [
        (20, 0, ("All 20 patients are labelled 0", "at least 3 patients labelled 1")),
        (0, 20, ("All 20 patients are labelled 1", "at least 3 patients labelled 0")),
        (19, 1, ("Only 1 of the 20 patients is labelled 1", "add patients labelled 1")),
        (2, 40, ("Only 2 of the 42 patients are labelled 0", "add patients labelled 0")),
    ],
)
@pytest.mark.parametrize("origin", ["seeded", "column", "saved"])
def test_a_weak_set_short_of_a_label_asks_for_that_label(n0, n1, words, origin):
    """No split can give val and test both labels: the advice is the missing label, never
    the split shares or the split column, whatever the split came from."""
    weak = _split([0] * n0 + [1] * n1, [90, 10, 23])
    with pytest.raises(InputError) as err:
        check_weak_splits(weak, "weak.csv", origin, [90, 10, 23])
    message = str(err.value)
    for word in ("needs both labels", *words):
        assert word in message, message
    for wrong in ("data.split.weak", "shares", "split column", "splits.csv", "Fix: give"):
        assert wrong not in message, message
    # an independent check that no split helps: with fewer than 3 of a label, some split
    # of train/val/test lacks it, whatever the shares
    for shares in ([1, 1, 1], [60, 20, 20], [34, 33, 33]):
        splits = _split([0] * n0 + [1] * n1, shares)
        assert any(
            len({r.label for r in splits if r.split == s}) < 2 for s in ("train", "val", "test")
        )


@pytest.mark.parametrize(("n0", "n1"), [(3, 3), (5, 3), (9, 3), (4, 8), (13, 7)])
def test_the_suggested_shares_split_the_set(n0, n1):
    """Both labels at least 3 times, too few patients for 90/10/23: the shares that the
    error suggests give every split both labels."""
    weak = _split([0] * n0 + [1] * n1, [90, 10, 23])
    with pytest.raises(InputError) as err:
        check_weak_splits(weak, "weak.csv", "seeded", [90, 10, 23])
    message = str(err.value)
    assert "data.split.weak" in message and "needs both labels" not in message
    found = re.search(r"e\.g\. \[(\d+), (\d+), (\d+)\]", message)
    assert found, message
    shares = [float(x) for x in found.groups()]
    check_weak_splits(_split([0] * n0 + [1] * n1, shares), "weak.csv", "seeded", shares)


def test_cli_train_on_an_all_negative_weak_set(tmp_path):
    weak, strong = manifests(tmp_path)
    rows = [[f"W{i}", f"w{i}.nii.gz", 0] for i in range(6)]
    write_csv(weak, ("patient_id", "image", "label"), rows)  # the scans manifests wrote
    out = tmp_path / "run"
    config = tiny_config(tmp_path, training={"epochs": 1}).model_dump(mode="json")
    config.pop("manifests")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, output = cli(
        "train", "--weak", weak, "--strong", strong, "--out", out, "--config", tmp_path / "c.yaml"
    )
    line = one_error(code, output, str(weak), "all 6 patients are labelled 0", "labelled 1")
    assert "data.split.weak" not in line
    assert not out.exists()
