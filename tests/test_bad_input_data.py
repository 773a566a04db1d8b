"""Bad input data of issue 14 that used to pass silently or leave half-written run folders.

* intensities that are not Hounsfield units (raw CT numbers, HU + 1024; values of no
  known calibration) and the ``data.hu_offset`` key;
* refusals after the run folder was made (bad mask spacing, ``precision: fp16`` on a CPU,
  anything refused in the first epoch): no run folder is left, the fixed command works;
* a strong set whose masks are all empty; a scan far smaller than the model's field of
  view at ``predict``; the same scan under two patient ids; ``predict`` rerun into the
  same ``--out``.

Each case checks the exit status 2 (command line) or the warning, a one-line message that
names the file, patient or key, and that nothing half-written is left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from lymphdx.core.config import DataConfig, load_config
from lymphdx.core.errors import ConfigError, InputError, LymphdxError
from lymphdx.data.calibration import intensity_calibration
from lymphdx.data.grid import canonical_grid, resample_image
from lymphdx.data.manifest import check_duplicate_scans, load_manifests
from lymphdx.data.preprocess import (
    Normalizer,
    PreprocessCache,
    check_calibration,
    settings_key,
)
from lymphdx.io import volumes as io
from lymphdx.io.geometry import Geometry, to_sitk
from lymphdx.io.volumes import write_volume
from tests.conftest import tiny_config
from tests.helpers import cli, one_error, write_csv, write_ct_series

SHAPE = (8, 16, 16)  # (z, y, x)
GEOMETRY = Geometry((4.0, 4.0, 6.0), (-30.0, -30.0, 0.0))
PLAIN = Geometry((4.0, 4.0, 6.0), (0.0, 0.0, 0.0))
RAW = 1024


# --------------------------------------------------------------------------- helpers


def ct_phantom(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A small CT-like int16 volume in HU, different for every seed: air around an
    elliptical body of fat (about -100 HU) with a soft-tissue core (about 40 HU)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    _, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    r = ((y - (ny - 1) / 2) / (0.42 * ny)) ** 2 + ((x - (nx - 1) / 2) / (0.45 * nx)) ** 2
    hu = np.full(shape, -1000.0)
    hu[r <= 1.0] = -100.0
    hu[r <= 0.45] = 40.0 + 10.0 * rng.random()
    hu += rng.normal(0.0, 12.0, shape)
    return np.round(hu).astype(np.int16)


def blob_mask(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    nz, ny, nx = shape
    mask[nz // 2 - 1 : nz // 2 + 2, ny // 2 - 2 : ny // 2 + 2, nx // 2 - 2 : nx // 2 + 2] = 1
    return mask


def dataset(
    tmp: Path,
    weak_offset: int = 0,
    strong_offset: int = 0,
    strong_masks: str = "blob",
    mask_spacing: tuple[float, float, float] | None = None,
) -> tuple[Path, Path]:
    """Six weak patients (a split column with both classes in every split) and two strong
    ones, every scan of its own content; returns the two manifests."""
    splits = ["train", "train", "val", "val", "test", "test"]
    weak_rows = []
    for i, split in enumerate(splits):
        write_volume(tmp / "weak" / f"w{i}.nii.gz", ct_phantom(i) + weak_offset, GEOMETRY)
        weak_rows.append([f"W{i}", f"w{i}.nii.gz", i % 2, split])
    strong_rows = []
    for i in range(2):
        write_volume(tmp / "strong" / f"s{i}.nii.gz", ct_phantom(100 + i) + strong_offset, GEOMETRY)
        mask = blob_mask() if strong_masks == "blob" else np.zeros(SHAPE, np.uint8)
        geometry = GEOMETRY
        if mask_spacing is not None and i == 1:
            geometry = Geometry(mask_spacing, GEOMETRY.origin, GEOMETRY.direction)
        write_volume(tmp / "strong" / f"s{i}_mask.nii.gz", mask, geometry)
        strong_rows.append([f"S{i}", f"s{i}.nii.gz", f"s{i}_mask.nii.gz"])
    weak = write_csv(
        tmp / "weak" / "weak.csv", ("patient_id", "image", "label", "split"), weak_rows
    )
    strong = write_csv(tmp / "strong" / "strong.csv", ("patient_id", "image", "mask"), strong_rows)
    return weak, strong


def config_yaml(
    tmp: Path, name: str = "config.yaml", training: dict | None = None, **overrides: object
) -> Path:
    """The tiny test config (1 epoch, on the CPU) as a YAML file for ``--config``."""
    training = {"epochs": 1, "device": "cpu", **(training or {})}
    data = tiny_config(tmp, training=training, **overrides).model_dump(mode="json")
    data.pop("manifests")
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders (``.tmp-*``, ``.old-*``) anywhere under ``root``."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-"))
    )


def train_args(weak: Path, strong: Path, run: Path, config: Path, *more: str) -> list[object]:
    return ["train", "--weak", weak, "--strong", strong, "--out", run, "--config", config, *more]


# --------------------------------------------------------------------------- 1. calibration


def test_calibration_tells_hu_from_raw_ct_numbers() -> None:
    hu = ct_phantom(0).astype(np.float32)
    assert intensity_calibration(hu).verdict == "hu"
    raw = intensity_calibration(hu + RAW)
    assert raw.verdict == "raw" and raw.offset == -RAW
    assert -100 <= raw.air_mode <= 100 and 900 <= raw.body_mode <= 1100
    # a crop inside the body (no air) still reads by its soft-tissue mode
    core = hu[:, 6:10, 6:10]
    assert intensity_calibration(core).verdict == "hu"
    assert intensity_calibration(core + RAW).verdict == "raw"
    # neither HU nor raw: normalised values, an MR-like scale, a constant
    assert intensity_calibration(hu / 1000.0).verdict == "unknown"
    assert intensity_calibration(hu + 400.0).verdict == "unknown"
    assert intensity_calibration(np.zeros(SHAPE, np.float32)).verdict == "unknown"


def test_calibration_of_a_real_ct_slice(tmp_path: Path) -> None:
    """pydicom's CT_small.dcm (a real abdominal slice): HU with its rescale intercept,
    raw CT numbers without it."""
    hu = io.read_volume(write_ct_series(tmp_path / "hu", 4).folder).array
    raw = io.read_volume(write_ct_series(tmp_path / "raw", 4, intercept=0.0).folder).array
    assert intensity_calibration(hu).verdict == "hu"
    assert intensity_calibration(raw).verdict == "raw"


def test_default_settings_key_and_arrays_are_unchanged(tmp_path: Path) -> None:
    """Unset ``data.hu_offset`` leaves the cache key and the arrays of HU scans as they
    were before the calibration check (existing caches stay valid)."""
    cfg = DataConfig(spacing=(7.5, 7.5, 12.0), shape=(32, 32, 16))
    before = {
        "version": 1,
        "spacing": [7.5, 7.5, 12.0],
        "shape": [32, 32, 16],
        "fit": "crop",
        "hu_window": [-250.0, 350.0],
    }
    text = json.dumps(before, sort_keys=True)
    assert settings_key(cfg) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert settings_key(cfg.model_copy(update={"hu_offset": 0.0})) != settings_key(cfg)
    assert settings_key(cfg.model_copy(update={"hu_offset": -1024.0})) != settings_key(
        cfg.model_copy(update={"hu_offset": 0.0})
    )
    path = write_volume(tmp_path / "a.nii.gz", ct_phantom(1), GEOMETRY)
    image = PreprocessCache(tmp_path / "cache", cfg).image(path, "P1")
    volume = io.read_volume(path)
    grid = canonical_grid(volume.geometry, volume.shape_xyz, cfg)
    direct = resample_image(to_sitk(volume.array, volume.geometry), grid, cfg)
    np.testing.assert_array_equal(image, direct)


def test_raw_ct_numbers_are_corrected_with_a_warning_naming_set_and_patients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lymphdx.engine.run_data import load_run_data

    weak, strong = dataset(tmp_path / "raw", strong_offset=RAW)
    dataset(tmp_path / "hu")  # the same scans in HU
    config = tiny_config(tmp_path, strategy="multitask")
    data = config.model_dump(mode="json")
    data["manifests"] = {"weak": str(weak), "strong": str(strong)}
    caplog.set_level(logging.WARNING, logger="lymphdx")
    run = tmp_path / "run"
    run.mkdir()
    loaded = load_run_data(load_config(overrides=data), run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    for word in ("the strong set", "2 of 2 scans", "raw CT numbers", "'S0'", "'S1'", "-1024"):
        assert word in warnings[0], (word, warnings[0])
    # the corrected scans are exactly the HU scans
    hu = PreprocessCache(tmp_path / "cache", config.data)
    for i in range(2):
        np.testing.assert_array_equal(
            loaded.cache.image(tmp_path / "raw" / "strong" / f"s{i}.nii.gz"),
            hu.image(tmp_path / "hu" / "strong" / f"s{i}.nii.gz"),
        )
        calibration, offset = loaded.cache.calibration(tmp_path / "raw" / "strong" / f"s{i}.nii.gz")
        assert calibration.verdict == "raw" and offset == -RAW
    # the strong z-score is fitted on HU values (not on a window clipped flat at 350)
    images = [hu.image(tmp_path / "hu" / "strong" / f"s{i}.nii.gz") for i in (0, 1)]
    assert loaded.normalizers["strong"] == Normalizer.fit(images)


def test_unknown_calibration_is_refused_naming_set_manifest_and_patient(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path, weak_offset=400)  # fat at 300, air at -600: no scale
    run = tmp_path / "run"
    code, output = cli(*train_args(weak, strong, run, config_yaml(tmp_path)))
    line = one_error(code, output, "the weak set", "calibration", "cannot be told", "hu_offset")
    assert str(weak) in line and "patient 'W0'" in line
    assert not run.exists()
    assert not leftovers(tmp_path)


def test_hu_offset_key_applies_to_every_scan_and_is_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weak, strong = dataset(tmp_path, weak_offset=RAW, strong_offset=RAW)
    cfg = DataConfig(spacing=(7.5, 7.5, 12.0), shape=(32, 32, 16), hu_offset=-1024)
    cache = PreprocessCache(tmp_path / "cache", cfg)
    caplog.set_level(logging.WARNING, logger="lymphdx")
    sets = {"weak": [("W0", tmp_path / "weak" / "w0.nii.gz")]}
    assert check_calibration(cache, sets) == {}  # the user said what the files hold
    assert not caplog.records
    reference = PreprocessCache(tmp_path / "cache", cfg.model_copy(update={"hu_offset": None}))
    hu = write_volume(tmp_path / "hu.nii.gz", ct_phantom(0), GEOMETRY)
    np.testing.assert_array_equal(cache.image(sets["weak"][0][1]), reference.image(hu))
    # recorded in config.yaml (dump_config) and read back
    from lymphdx.core.config import dump_config

    config = tiny_config(tmp_path, data={"hu_offset": -1024})
    assert yaml.safe_load(dump_config(config))["data"]["hu_offset"] == -1024
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"data": {"hu_offset": float("nan")}})
    assert "data.hu_offset" in str(err.value) and "\n" not in str(err.value)


def test_an_old_cache_entry_without_calibration_is_remade(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "a.nii.gz", ct_phantom(2) + RAW, GEOMETRY)
    cfg = DataConfig(spacing=(7.5, 7.5, 12.0), shape=(32, 32, 16))
    cache = PreprocessCache(tmp_path / "cache", cfg)
    first = cache.image(path)
    (meta,) = (tmp_path / "cache" / settings_key(cfg)).glob("img-*.json")
    old = json.loads(meta.read_text())
    old.pop("calibration")
    old.pop("hu_offset")
    meta.write_text(json.dumps(old))
    np.save(meta.with_suffix(".npy"), np.full_like(first, 350.0))  # what the old code made
    again = PreprocessCache(tmp_path / "cache", cfg).image(path)
    np.testing.assert_array_equal(again, first)
    assert "calibration" in json.loads(meta.read_text())


# --------------------------------------------------------------------------- 2. half-written runs


def test_bad_mask_spacing_leaves_no_run_folder_and_the_fixed_command_works(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path, mask_spacing=(4.0, 4.0, 5.0))
    run = tmp_path / "run"
    config = config_yaml(tmp_path, strategy="multitask")
    code, output = cli(*train_args(weak, strong, run, config))
    line = one_error(code, output, "patient 'S1'", "geometry")
    assert "s1_mask.nii.gz" in line
    assert not run.exists(), sorted(p.name for p in run.iterdir())
    assert not leftovers(tmp_path)
    # fix the mask: the same command (no --resume) simply works
    write_volume(tmp_path / "strong" / "s1_mask.nii.gz", blob_mask(), GEOMETRY)
    code, output = cli(*train_args(weak, strong, run, config))
    assert code == 0, output
    assert (run / "checkpoints" / "last.pt").exists()


def test_fp16_on_cpu_leaves_no_run_folder_and_the_fixed_command_works(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path)
    run = tmp_path / "run"
    bad = config_yaml(tmp_path, "fp16.yaml", strategy="supervised", training={"precision": "fp16"})
    code, output = cli(*train_args(weak, strong, run, bad))
    one_error(code, output, "training.precision", "fp16", "CUDA")
    assert not run.exists()
    # --resume has nothing to replay; the fixed config simply works
    code, output = cli("train", "--resume", "--out", run)
    assert code == 2 and not (run / "config.yaml").exists(), output
    good = config_yaml(tmp_path, "fp32.yaml", strategy="supervised")
    code, output = cli(*train_args(weak, strong, run, good))
    assert code == 0, output
    assert (run / "checkpoints" / "last.pt").exists()


def test_a_refusal_inside_the_first_epoch_leaves_no_run_folder(tmp_path: Path) -> None:
    from lymphdx.engine.train import train
    from lymphdx.engine.trainer import Trainer

    class Refusing(Trainer):
        def train_epoch(self) -> None:  # what a scan read only during the epoch would raise
            raise InputError("cannot read: truncated", tmp_path / "weak" / "w2.nii.gz", "W2")

    weak, strong = dataset(tmp_path)
    config = tiny_config(tmp_path, strategy="supervised", training={"epochs": 1})
    run = tmp_path / "run"
    with pytest.raises(InputError, match="W2"):
        train(config, run, weak, strong, progress=False, trainer=Refusing)
    assert not run.exists()
    # an existing folder given as --out is emptied of the run's files, not removed
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        train(config, run, weak, strong, progress=False, trainer=Refusing)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- 4a. empty masks


def test_a_strong_set_whose_masks_are_all_empty_is_refused(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path, strong_masks="empty")
    run = tmp_path / "run"
    code, output = cli(*train_args(weak, strong, run, config_yaml(tmp_path, strategy="ssmdmt")))
    line = one_error(code, output, "training masks are all empty", "only zeros", "supervised")
    assert str(strong) in line and "patient 'S0'" in line
    assert not run.exists()
    assert not leftovers(tmp_path)
    # a strategy that uses no masks trains on the same data
    code, output = cli(
        *train_args(weak, strong, run, config_yaml(tmp_path, "sup.yaml", strategy="supervised"))
    )
    assert code == 0, output


def test_masks_that_mark_nodes_only_outside_the_input_grid_are_refused(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path)
    big = (8, 16, 60)  # 240 mm along x; the nodes at its edge fall outside a 96 mm input grid
    for i in range(2):
        write_volume(tmp_path / "strong" / f"s{i}.nii.gz", ct_phantom(100 + i, big), GEOMETRY)
        mask = np.zeros(big, np.uint8)
        mask[3:5, 6:9, 1:3] = 1
        write_volume(tmp_path / "strong" / f"s{i}_mask.nii.gz", mask, GEOMETRY)
    config = config_yaml(tmp_path, strategy="multitask", data={"shape": [16, 32, 16]})
    run = tmp_path / "run"
    code, output = cli(*train_args(weak, strong, run, config))
    one_error(code, output, "all empty", "outside the model's input grid", "data.shape")
    assert not run.exists()


# --------------------------------------------------------------------------- 4c. duplicates


def test_the_same_scan_under_two_ids_with_opposite_labels_is_refused(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path)
    shutil.copy(tmp_path / "weak" / "w0.nii.gz", tmp_path / "weak" / "w1.nii.gz")  # W1: label 1
    run = tmp_path / "run"
    code, output = cli(*train_args(weak, strong, run, config_yaml(tmp_path)))
    line = one_error(code, output, "identical content", "opposite labels")
    assert "'W0'" in line and "'W1'" in line and str(weak) in line
    assert not run.exists()  # no splits.csv written for refused data

    w, s = load_manifests(weak, strong)
    cache = PreprocessCache(tmp_path / "cache", DataConfig())
    with pytest.raises(InputError, match="'W0' and 'W1'"):
        check_duplicate_scans(w, s, cache.content_hash)


def test_the_same_scan_in_both_sets_is_refused(tmp_path: Path) -> None:
    weak, strong = dataset(tmp_path)
    shutil.copy(tmp_path / "weak" / "w3.nii.gz", tmp_path / "strong" / "s1.nii.gz")
    w, s = load_manifests(weak, strong)
    cache = PreprocessCache(tmp_path / "cache", DataConfig())
    with pytest.raises(InputError) as err:
        check_duplicate_scans(w, s, cache.content_hash)
    message = str(err.value)
    assert "'W3'" in message and "'S1'" in message and "strong set" in message
    assert "\n" not in message
    check_duplicate_scans(w, [], cache.content_hash)  # the weak set alone is fine


# --------------------------------------------------------------------------- 4b, 4d. predict


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch supervised run on the small phantoms (seconds)."""
    from lymphdx.engine.train import train

    tmp = tmp_path_factory.mktemp("issue14_run")
    weak, strong = dataset(tmp)
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1, "device": "cpu"})
    train(config, tmp / "run", weak, strong, progress=False)
    return tmp / "run"


def test_predict_warns_on_a_scan_far_smaller_than_the_field_of_view(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lymphdx.workflows.predict import predict

    caplog.set_level(logging.WARNING, logger="lymphdx")
    small = write_volume(
        tmp_path / "small.nii.gz",
        ct_phantom(7, (2, 80, 80)),
        Geometry((0.8, 0.8, 8.0), (0.0, 0.0, 0.0)),
    )
    whole = write_volume(tmp_path / "whole.nii.gz", ct_phantom(8, (32, 64, 64)), PLAIN)
    out = tmp_path / "out"
    small_result, whole_result = predict(run, [small, whole], out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # the fixture's run was never evaluated: one run-level note that it is uncalibrated
    warnings = [w for w in warnings if not w.startswith("uncalibrated:")]
    assert len(warnings) == 1 and str(small) in warnings[0], warnings
    assert "fills only" in warnings[0] and "\n" not in warnings[0]
    saved = json.loads((out / "small" / "prediction.json").read_text())
    assert saved["coverage_warning"] == small_result["coverage_warning"]
    assert "fills only" in saved["coverage_warning"] and saved["coverage"] < 0.01
    whole_saved = json.loads((out / "whole" / "prediction.json").read_text())
    assert whole_saved["coverage_warning"] is None and whole_saved["coverage"] == 1.0
    assert whole_saved["hu_offset"] == 0.0 and whole_saved["calibration_warning"] is None
    assert whole_result["probability"] == whole_saved["probability"]
    assert not leftovers(tmp_path)


def test_predict_corrects_raw_ct_numbers_and_records_it(run: Path, tmp_path: Path) -> None:
    from lymphdx.workflows.predict import predict

    hu = write_volume(tmp_path / "hu.nii.gz", ct_phantom(9, (32, 64, 64)), PLAIN)
    raw = write_volume(tmp_path / "raw.nii.gz", ct_phantom(9, (32, 64, 64)) + RAW, PLAIN)
    a, b = predict(run, [hu, raw], tmp_path / "out")
    assert b["hu_offset"] == -RAW and "raw CT numbers" in b["calibration_warning"]
    assert b["probability"] == pytest.approx(a["probability"], abs=1e-6)


def test_predict_rerun_into_the_same_out_keeps_only_the_new_outputs(
    run: Path, tmp_path: Path
) -> None:
    geometry = PLAIN
    a = write_volume(tmp_path / "a.nii.gz", ct_phantom(10, (16, 32, 32)), geometry)
    b = write_volume(tmp_path / "b.nii.gz", ct_phantom(11, (16, 32, 32)), geometry)
    out = tmp_path / "out"
    code, output = cli("predict", "--model", run, a, b, "--out", out)
    assert code == 0, output
    (out / "notes.txt").write_text("mine")  # not lymphdx's: left alone
    (out / "mine").mkdir()
    (out / "mine" / "prediction.json").write_text("{}")
    (out / "mine" / "draft.txt").write_text("also mine")
    old = json.loads((out / "a" / "prediction.json").read_text())

    code, output = cli("predict", "--model", run, a, "--out", out)
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == ["a", "mine", "notes.txt", "summary.csv"]
    assert sorted(p.name for p in (out / "a").iterdir()) == [
        "findings.csv",
        "findings.mrk.json",
        "overlay.png",
        "prediction.json",
        "roi_mask.nii.gz",
        "roi_prob.nii.gz",
    ]
    assert json.loads((out / "a" / "prediction.json").read_text()) == old  # same scan, same run
    assert not leftovers(tmp_path)

    # a rerun stopped by a bad scan leaves only this run's complete outputs: no stale b
    code, output = cli("predict", "--model", run, b, "--out", out)
    assert code == 0, output
    bad = tmp_path / "b_bad" / "b.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b.read_bytes()[:200])
    code, output = cli("predict", "--model", run, a, bad, "--out", out)
    one_error(code, output, "truncated", str(bad))
    assert sorted(p.name for p in out.iterdir()) == ["a", "mine", "notes.txt", "summary.csv"]
    assert not leftovers(tmp_path)


def test_predict_a_folder_and_a_manifest_reports_a_bad_scan_and_goes_on(
    run: Path, tmp_path: Path
) -> None:
    """Many scans at once: a folder of scans (a DICOM series subfolder among them) and a
    manifest. The truncated scan in the middle is reported in summary.csv and in one error
    line at the end; the scans after it are predicted; no half-written folder is left."""
    import csv

    batch = tmp_path / "batch"
    batch.mkdir()
    write_volume(batch / "a.nii.gz", ct_phantom(12, (16, 32, 32)), PLAIN)
    good = write_volume(tmp_path / "c.nii.gz", ct_phantom(13, (16, 32, 32)), PLAIN)
    (batch / "b.nii.gz").write_bytes(good.read_bytes()[:200])  # truncated
    write_ct_series(batch / "d_series", n_slices=16)
    (batch / "notes.txt").write_text("not a scan")  # ignored
    manifest = write_csv(tmp_path / "more.csv", ["patient_id", "image"], [["P7", "c.nii.gz"]])
    out = tmp_path / "out"
    code, output = cli("predict", "--model", run, batch, "--manifest", manifest, "--out", out)
    line = one_error(code, output, "1 of 4 scans failed", "truncated", str(batch / "b.nii.gz"))
    assert "summary.csv" in line
    assert sorted(p.name for p in out.iterdir()) == ["a", "c", "d_series", "summary.csv"]
    with open(out / "summary.csv") as f:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert list(rows) == ["a.nii.gz", "b.nii.gz", "d_series", "c.nii.gz"]  # in order
    assert rows["b.nii.gz"]["status"] == "failed" and "truncated" in rows["b.nii.gz"]["error"]
    for name in ("a.nii.gz", "d_series", "c.nii.gz"):
        row = rows[name]
        assert row["status"] == "ok" and row["error"] == "" and int(row["nodes"]) >= 0
        saved = json.loads((out / row["output"] / "prediction.json").read_text())
        assert float(row["probability"]) == pytest.approx(saved["probability"], abs=1e-6)
        assert int(row["nodes"]) == len(saved["findings"])
    assert rows["c.nii.gz"]["patient_id"] == "P7"
    assert not leftovers(tmp_path)


def test_refused_runs_raise_lymphdx_errors_only(tmp_path: Path) -> None:
    """The library path (no command line) raises the same one-line errors."""
    from lymphdx.engine.train import train

    weak, strong = dataset(tmp_path, strong_masks="empty")
    config = tiny_config(tmp_path, strategy="multitask", training={"epochs": 1, "device": "cpu"})
    with pytest.raises(LymphdxError) as err:
        train(config, tmp_path / "run", weak, strong, progress=False)
    assert "\n" not in str(err.value) and "all empty" in str(err.value)
    assert not (tmp_path / "run").exists()
