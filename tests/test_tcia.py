"""prepare-tcia on TCIA-shaped trees made of real DICOM files (nested, flat, broken)."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.errors import InputError
from lymphdx.data.manifest import load_strong_manifest
from lymphdx.io.tcia import prepare_tcia, report_path
from lymphdx.io.volumes import read_mask, read_volume
from tests.conftest import tiny_config
from tests.helpers import make_tcia_tree, write_ct_series, write_tcia_mask

runner = CliRunner()


def rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def assert_masks_match(csv_path: Path, cases) -> None:
    """Every manifest row loads with lymphdx's own readers, mask on the image's grid, and
    the instance ids sit where the fixture put them."""
    for record in load_strong_manifest(csv_path):
        volume = read_volume(record.image, record.patient_id)
        case = cases[record.patient_id]
        np.testing.assert_array_equal(volume.array, case.series.hu)
        mask = read_mask(record.mask, volume.geometry, volume.array.shape, record.patient_id)
        np.testing.assert_array_equal(mask.array, (case.mask != 0).astype(np.uint8))
        ids = sitk.GetArrayFromImage(sitk.ReadImage(str(record.mask)))
        np.testing.assert_array_equal(ids, case.mask)  # instance ids kept


def patient(report, pid: str):
    return next(p for p in report.patients if p.patient == pid)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_layouts_give_a_manifest_with_aligned_masks(tmp_path, layout):
    root = tmp_path / "dl"
    cases = make_tcia_tree(root, layout)
    before = snapshot(root)
    out = tmp_path / "data" / "strong.csv"
    report = prepare_tcia(root, out, region="all")
    assert [p.patient for p in report.written] == sorted(cases)
    assert all(p.alignment == "y and x swapped" for p in report.written)
    assert all("annotated node centres" in p.aligned_by for p in report.written)
    assert all(p.nodes == 3 and not p.nodes_outside for p in report.written)
    table = rows(out)
    assert list(table[0]) == ["patient_id", "image", "mask"]
    for row in table:
        assert not Path(row["image"]).is_absolute() and not Path(row["mask"]).is_absolute()
        assert row["mask"] == f"tcia_masks/{row['patient_id']}.nii.gz"
    assert_masks_match(out, cases)
    assert snapshot(root) == before  # the download is never modified
    saved = json.loads(report_path(out).read_text())
    assert saved["n_written"] == 3 and saved["n_skipped"] == 0


def test_default_region_is_abdominal(tmp_path):
    make_tcia_tree(tmp_path / "dl")
    report = prepare_tcia(tmp_path / "dl", tmp_path / "abd.csv")
    assert [r["patient_id"] for r in rows(tmp_path / "abd.csv")] == [
        "ABD_LYMPH_001",
        "ABD_LYMPH_002",
    ]
    assert report.other_region == 1
    prepare_tcia(tmp_path / "dl", tmp_path / "med.csv", region="med")
    assert [r["patient_id"] for r in rows(tmp_path / "med.csv")] == ["MED_LYMPH_001"]
    with pytest.raises(InputError, match="unknown region"):
        prepare_tcia(tmp_path / "dl", tmp_path / "x.csv", region="neck")


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    ("style", "words"),
    [("aligned", "as stored"), ("flip_z", "z reversed"), ("swap_flip_z", "y and x swapped; z")],
)
def test_mask_alignment_by_geometry_and_annotations(tmp_path, style, words):
    cases = make_tcia_tree(tmp_path / "dl", patients=["ABD_LYMPH_001"], mask_style=style)
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    result = patient(report, "ABD_LYMPH_001")
    assert result.alignment.startswith(words), result.alignment
    if style == "aligned":  # already on the image's grid: the original file is used
        assert "header geometry" in result.aligned_by
        assert rows(out)[0]["mask"].endswith(
            "MED_ABD_LYMPH_MASKS/ABD_LYMPH_001/ABD_LYMPH_001_mask.nii.gz"
        )
        assert not (tmp_path / "tcia_masks").exists()
    assert_masks_match(out, cases)


def test_centre_outside_the_mask_is_reported(tmp_path):
    cases = make_tcia_tree(tmp_path / "dl", patients=["ABD_LYMPH_001", "ABD_LYMPH_002"])
    points = tmp_path / "dl" / "MED_ABD_LYMPH_ANNOTATIONS" / "ABD_LYMPH_002"
    points = points / "ABD_LYMPH_002_lymphnodes_physicalPoints.txt"
    far = cases["ABD_LYMPH_002"].points[0] + np.array([20.0, 20.0, 0.0])
    points.write_text(points.read_text() + f"{far[0]} {far[1]} {far[2]}\n")
    out = tmp_path / "strong.csv"
    result = runner.invoke(app, ["prepare-tcia", "--root", str(tmp_path / "dl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ABD_LYMPH_002: 1 of 4 annotated node centres lie outside the mask" in result.output
    assert "ABD_LYMPH_001: 1 of" not in result.output
    saved = json.loads(report_path(out).read_text())
    bad = next(p for p in saved["patients"] if p["patient"] == "ABD_LYMPH_002")
    assert [o["line"] for o in bad["nodes_outside"]] == [4]
    assert len(rows(out)) == 2  # reported, still used


def test_mask_that_cannot_be_aligned_is_refused(tmp_path):
    cases = make_tcia_tree(
        tmp_path / "dl", patients=["ABD_LYMPH_001", "ABD_LYMPH_002", "ABD_LYMPH_003"]
    )
    masks = tmp_path / "dl" / "MED_ABD_LYMPH_MASKS"
    # 2: a mask of another size; 3: nodes where the annotations are not (another scan's)
    wrong_size = masks / "ABD_LYMPH_002" / "ABD_LYMPH_002_mask.nii.gz"
    write_tcia_mask(wrong_size, cases["ABD_LYMPH_002"].mask[:-1], "tcia", np.eye(4))
    elsewhere = np.roll(cases["ABD_LYMPH_003"].mask, 40, axis=2)
    write_tcia_mask(
        masks / "ABD_LYMPH_003" / "ABD_LYMPH_003_mask.nii.gz", elsewhere, "tcia", np.eye(4)
    )
    out = tmp_path / "strong.csv"
    result = runner.invoke(app, ["prepare-tcia", "--root", str(tmp_path / "dl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    two = next(line for line in lines if line.startswith("ABD_LYMPH_002: skipped"))
    assert str(wrong_size) in two and "cannot be made the CT's size" in two
    three = next(line for line in lines if line.startswith("ABD_LYMPH_003: skipped"))
    assert "cannot be aligned" in three
    assert "no transpose or flip of it puts any of the 3 annotated node centres" in three
    assert [r["patient_id"] for r in rows(out)] == ["ABD_LYMPH_001"]


def test_without_annotations_geometry_or_the_other_patients_decide(tmp_path):
    styles = {"ABD_LYMPH_001": "tcia", "ABD_LYMPH_002": "tcia", "ABD_LYMPH_003": "aligned"}
    cases = make_tcia_tree(tmp_path / "dl", patients=list(styles), mask_style=styles)
    notes = tmp_path / "dl" / "MED_ABD_LYMPH_ANNOTATIONS"
    shutil.rmtree(notes / "ABD_LYMPH_002")
    shutil.rmtree(notes / "ABD_LYMPH_003")
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    two, three = patient(report, "ABD_LYMPH_002"), patient(report, "ABD_LYMPH_003")
    assert two.alignment == "y and x swapped"
    assert "annotations decided for 1 other patient" in two.aligned_by
    assert any("node-centre check is skipped" in w for w in two.warnings)
    assert three.aligned_by == "the mask's header geometry alone (no annotations)"
    assert_masks_match(out, cases)


def test_without_annotations_or_agreement_the_mask_is_refused(tmp_path):
    make_tcia_tree(tmp_path / "dl", patients=["ABD_LYMPH_001"])
    shutil.rmtree(tmp_path / "dl" / "MED_ABD_LYMPH_ANNOTATIONS")
    with pytest.raises(InputError) as err:
        prepare_tcia(tmp_path / "dl", tmp_path / "strong.csv")
    message = str(err.value)
    assert "'ABD_LYMPH_001'" in message and "cannot be aligned" in message
    assert "no annotation files" in message
    assert not (tmp_path / "strong.csv").exists()


# --------------------------------------------------------------------------- what is missing


def test_missing_pieces_are_named_per_patient(tmp_path):
    ids = ["ABD_LYMPH_001", "ABD_LYMPH_002", "ABD_LYMPH_003", "ABD_LYMPH_004"]
    cases = make_tcia_tree(tmp_path / "dl", patients=ids)
    root = tmp_path / "dl"
    (root / "MED_ABD_LYMPH_MASKS" / "ABD_LYMPH_002" / "ABD_LYMPH_002_mask.nii.gz").unlink()
    shutil.rmtree(cases["ABD_LYMPH_003"].series.folder.parent.parent)  # download interrupted
    # 4: one slice missing from the download; the mask (made for all slices) no longer fits
    cases["ABD_LYMPH_004"].series.files[0].unlink()
    out = tmp_path / "strong.csv"
    report = prepare_tcia(root, out)
    assert [p.patient for p in report.written] == ["ABD_LYMPH_001"]
    two = patient(report, "ABD_LYMPH_002").problem
    assert "no mask (ABD_LYMPH_002_mask.nii.gz" in two
    three = patient(report, "ABD_LYMPH_003").problem
    assert "metadata.csv lists series" in three and "folder is missing" in three
    assert "no CT series" in three
    four = patient(report, "ABD_LYMPH_004").problem
    assert "holds 7 of the 8 slices" in four and "cannot be made the CT's size" in four


def test_gap_in_the_series_resamples_image_and_mask_together(tmp_path):
    cases = make_tcia_tree(tmp_path / "dl", patients=["ABD_LYMPH_001"])
    case = cases["ABD_LYMPH_001"]
    z = int(np.argmin(np.abs((case.series.positions - case.series.positions[0])[:, 2] - 7.5)))
    case.series.files[z].unlink()  # slice 3 of 8 missing; the mask was made without it
    raw_mask = np.delete(case.mask, z, axis=0)
    masks = tmp_path / "dl" / "MED_ABD_LYMPH_MASKS" / "ABD_LYMPH_001"
    write_tcia_mask(masks / "ABD_LYMPH_001_mask.nii.gz", raw_mask, "tcia", np.eye(4))
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    result = patient(report, "ABD_LYMPH_001")
    assert result.status == "ok", result.problem
    assert any(w.startswith("gap of 5.00 mm") for w in result.warnings)
    assert any("holds 7 of the 8 slices" in w for w in result.warnings)
    (record,) = load_strong_manifest(out)
    volume = read_volume(record.image)
    mask = read_mask(record.mask, volume.geometry, volume.array.shape)
    assert volume.array.shape == case.mask.shape  # back to 8 slices
    keep = [k for k in range(8) if k != z]
    np.testing.assert_array_equal(mask.array[keep], case.mask[keep] != 0)


def test_several_series_in_the_patient_folder_image_copy_written(tmp_path):
    cases = make_tcia_tree(tmp_path / "dl", patients=["ABD_LYMPH_001"])
    folder = cases["ABD_LYMPH_001"].series.folder
    write_ct_series(
        folder, 3, name_prefix="scout-", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    out = tmp_path / "strong.csv"
    report = prepare_tcia(tmp_path / "dl", out)
    result = patient(report, "ABD_LYMPH_001")
    assert any("most slices of an axial CT" in w for w in result.warnings)
    assert rows(out)[0]["image"] == "tcia_images/ABD_LYMPH_001.nii.gz"
    assert_masks_match(out, cases)


def test_non_ct_series_is_refused(tmp_path):
    make_tcia_tree(tmp_path / "dl", patients=["ABD_LYMPH_001", "ABD_LYMPH_002"])
    folder = next((tmp_path / "dl").rglob("2.000000-ABDLYMPH002-*"))
    shutil.rmtree(folder)
    write_ct_series(folder, 8, modality="MR")
    report = prepare_tcia(tmp_path / "dl", tmp_path / "strong.csv")
    assert "is MR, not CT" in patient(report, "ABD_LYMPH_002").problem


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(
        app, ["prepare-tcia", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 2
    assert "no ABD_LYMPH_### patients found" in result.output
    result = runner.invoke(
        app, ["prepare-tcia", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 2 and "does not exist" in result.output


# --------------------------------------------------------------------------- README how-to


def readme_commands() -> list[list[str]]:
    """The `lymphdx ...` lines of the README's TCIA section, as argument lists."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Real data: TCIA CT Lymph Nodes") :]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [
        shlex.split(line)[1:]
        for b in blocks
        for line in b.splitlines()
        if line.startswith("lymphdx ")
    ]


def test_readme_howto_works_as_written_on_the_fixture_tree(tmp_path, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids = [f"ABD_LYMPH_00{i}" for i in range(1, 5)] + ["MED_LYMPH_001"]
    make_tcia_tree(tmp_path / "tcia_download", patients=ids)  # the README's folder name
    prepare, compare = readme_commands()
    assert prepare[0] == "prepare-tcia" and compare[0] == "compare"
    result = runner.invoke(app, prepare)
    assert result.exit_code == 0, result.output
    strong = Path(prepare[prepare.index("--out") + 1])
    assert len(rows(strong)) == 4  # the abdominal patients
    # step 3: the weak-set manifest as the README shows it, for "your own scans" (here the
    # synthetic weak scans), paths relative to the CSV's folder
    weak = Path(compare[compare.index("--weak") + 1])
    source = tiny_data / "weak" / "manifest.csv"
    weak.parent.mkdir(parents=True)
    shutil.copytree(source.parent, weak.parent / "scans")
    lines = ["patient_id,image,label"]
    for row in rows(source):
        lines.append(f"{row['patient_id']},scans/{row['image']},{row['label']}")
    weak.write_text("\n".join(lines) + "\n")
    # step 4 as written, plus options that make it a seconds-long test run
    config = tiny_config(tmp_path, training={"epochs": 1}).model_dump(mode="json")
    config.pop("manifests")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    fast = ["--config", "tiny.yaml", "--strategies", "multitask", "--seeds", "1"]
    result = runner.invoke(app, compare + fast)
    assert result.exit_code == 0, result.output
    out = Path(compare[compare.index("--out") + 1])
    assert json.loads((out / "results.json").read_text())["strategies"]["multitask"]
