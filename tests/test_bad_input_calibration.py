"""Issue 28 item 1: intensities that are neither HU nor HU + 1024.

* a scan stored as another linear map of HU (``(HU + 1024) / 8`` as uint8, ``/ 16``,
  ``/ 4``, tenths of HU) is told by the map that made it and corrected by exactly that
  map, by training's cache and by ``predict`` alike, with a warning naming the map and
  the patients (on the terminal too, as the raw CT numbers' -1024 now is);
* HU and raw CT numbers are read as before, and HU scans that could pass for a scaled
  one (crops inside the body, lung, contrast, metal, padding, the ``synth`` phantoms of
  both hospitals, ``--shift 2``) stay HU;
* what cannot be told (normalised, z-scored, windowed values, other slopes) is refused by
  training, naming the patient, and warned about by ``predict`` in ``summary.csv``'s
  ``warnings`` column; ``data.hu_scale`` / ``data.hu_offset`` give the map instead.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml

from lymphdx.core.config import DataConfig, dump_config, load_config
from lymphdx.core.errors import ConfigError
from lymphdx.data.calibration import calibrate, check_calibration, intensity_calibration
from lymphdx.data.preprocess import PreprocessCache, settings_key
from lymphdx.data.synthetic import SynthSpec, make_scan
from lymphdx.io import volumes as io
from lymphdx.io.geometry import Geometry
from lymphdx.io.volumes import write_volume
from tests.conftest import tiny_config
from tests.helpers import cli, one_error, write_ct_series
from tests.test_bad_input_data import (
    GEOMETRY,
    PLAIN,
    RAW,
    config_yaml,
    ct_phantom,
    dataset,
    leftovers,
    train_args,
)

CFG = DataConfig(spacing=(7.5, 7.5, 12.0), shape=(32, 32, 16))


# --------------------------------------------------------------------------- scans


@cache
def synth(hospital: str, shift: float = 1.0, seed: int = 1) -> np.ndarray:
    """A ``lymphdx synth`` scan in HU ``(z, y, x)`` (hospital A or B, B moved by ``shift``)."""
    spec = SynthSpec(shift=shift)
    return make_scan(np.random.default_rng(seed), spec.hospital(hospital), None).hu


def chest(seed: int = 0, shape: tuple[int, int, int] = (16, 64, 64)) -> np.ndarray:
    """A HU phantom of a chest: air around a body of fat and soft tissue, two lungs
    (about -850 HU, 20 % of the voxels) and a contrast-filled vessel (300 HU)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    _, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    r = ((y - (ny - 1) / 2) / (0.42 * ny)) ** 2 + ((x - (nx - 1) / 2) / (0.45 * nx)) ** 2
    hu = np.full(shape, -1000.0)
    hu[r <= 1.0] = -100.0
    hu[r <= 0.8] = 50.0
    for centre in (0.3, 0.7):
        lung = ((y - ny / 2) / (0.3 * ny)) ** 2 + ((x - centre * nx) / (0.15 * nx)) ** 2 <= 1
        hu[lung] = -850.0 + rng.normal(0.0, 60.0, int(lung.sum()))
    hu[((y - 0.55 * ny) / 3) ** 2 + ((x - nx / 2) / 3) ** 2 <= 1] = 300.0
    hu += rng.normal(0.0, 12.0, shape)
    return np.round(hu).astype(np.float32)


def stored_over(k: int) -> Callable[[np.ndarray], np.ndarray]:
    """Raw CT numbers cut by ``k`` (``(HU + 1024) / k``, rounded down), as an 8-bit
    export writes them (uint8, clipped) for k >= 8, else uint16."""

    def store(hu: np.ndarray) -> np.ndarray:
        values = np.floor((np.asarray(hu, np.float64) + 1024.0) / k)
        if k >= 8:
            return np.clip(values, 0, 255).astype(np.uint8)
        return np.clip(values, 0, None).astype(np.uint16)

    return store


#: name -> (how the file stores HU, scale, offset of the map back: HU = scale * v + offset)
STORED: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, float]] = {
    "(HU+1024)/8 uint8": (stored_over(8), 8.0, -1024.0),
    "(HU+1024)/16 uint8": (stored_over(16), 16.0, -1024.0),
    "(HU+1024)/4 uint16": (stored_over(4), 4.0, -1024.0),
    "HU*10 int32": (lambda hu: np.round(np.asarray(hu) * 10).astype(np.int32), 0.1, 0.0),
}
#: HU scans that must stay HU (and their + 1024 raw CT numbers)
WHOLE: dict[str, Callable[[], np.ndarray]] = {
    "phantom": lambda: ct_phantom(0, (16, 64, 64)).astype(np.float32),
    "synth A": lambda: synth("A"),
    "synth B": lambda: synth("B"),
    "synth B --shift 2": lambda: synth("B", shift=2.0),
    "chest with lung and contrast": lambda: chest(),
}


def with_metal(hu: np.ndarray) -> np.ndarray:
    out = hu.copy()
    nz, ny, nx = out.shape
    out[:, ny // 2 - 2 : ny // 2 + 1, nx // 2 - 2 : nx // 2 + 1] = 3071.0
    return out


def padded(hu: np.ndarray, value: float) -> np.ndarray:
    out = hu.copy()
    out[:, : out.shape[1] // 6] = value
    return out


def centre_crop(hu: np.ndarray, share: float = 0.25) -> np.ndarray:
    _, ny, nx = hu.shape
    dy, dx = int(ny * share), int(nx * share)
    return hu[:, ny // 2 - dy : ny // 2 + dy, nx // 2 - dx : nx // 2 + dx]


def quantised(hu: np.ndarray, scale: float, offset: float, store: Callable) -> np.ndarray:
    """The HU a scan stored by ``store`` holds: ``scale * store(hu) + offset`` by hand."""
    return (store(hu).astype(np.float64) * scale + offset).astype(np.float32)


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("source", list(WHOLE))
@pytest.mark.parametrize("stored", list(STORED))
def test_a_scaled_scan_is_told_by_the_map_that_made_it(stored: str, source: str) -> None:
    store, scale, offset = STORED[stored]
    hu = WHOLE[source]()
    values = store(hu)
    calibration = intensity_calibration(values)
    assert calibration.verdict == "scaled", calibration
    assert (calibration.scale, calibration.offset) == (scale, offset)
    # the modes, in the file's own units, are where the map puts outside air and the body
    assert abs(calibration.air_mode * scale + offset + 1000.0) <= 50.0, calibration
    assert -200.0 <= calibration.body_mode * scale + offset <= 150.0, calibration
    corrected, told, applied = calibrate(values.astype(np.float32), CFG)
    assert told == calibration and applied == (scale, offset)
    np.testing.assert_allclose(corrected, quantised(hu, scale, offset, store), atol=1e-3)
    # within the storage's rounding of the HU the scan was made from (where not clipped)
    kept = (hu > -1024.0) & (hu < 1016.0)
    assert np.abs(corrected - hu)[kept].max() < max(scale, 1.0)


def test_the_map_is_named_as_a_formula() -> None:
    told = intensity_calibration(stored_over(8)(synth("A")))
    assert told.map_text == "HU = 8 * value - 1024"
    assert intensity_calibration(synth("A") * 10).map_text == "HU = 0.1 * value"
    assert intensity_calibration(synth("A")).map_text == "HU = value"
    assert intensity_calibration(synth("A") + RAW).map_text == "HU = value - 1024"


def _hu_cases() -> dict[str, Callable[[], np.ndarray]]:
    cases = dict(WHOLE)
    cases.update(
        {
            "metal": lambda: with_metal(synth("A")),
            "padding -2000": lambda: padded(synth("B"), -2000.0),
            "padding -3024": lambda: padded(ct_phantom(3, (16, 64, 64)).astype(np.float32), -3024),
        }
    )
    return cases


@pytest.mark.parametrize("name", list(_hu_cases()))
def test_hu_and_raw_ct_numbers_are_read_as_before(name: str) -> None:
    hu = _hu_cases()[name]()
    told = intensity_calibration(hu)
    assert (told.verdict, told.scale, told.offset) == ("hu", 1.0, 0.0), told
    assert told.air_mode is not None and abs(told.air_mode + 1000.0) <= 100.0
    same, _, applied = calibrate(hu, CFG)
    assert same is hu and applied == (1.0, 0.0)  # not even copied
    padding = hu <= -2000  # stays the constant the converter wrote
    raw = np.where(padding, hu, hu + RAW)
    told = intensity_calibration(raw)
    assert (told.verdict, told.scale, told.offset) == ("raw", 1.0, -RAW), told
    np.testing.assert_array_equal(calibrate(raw, CFG)[0][~padding], hu[~padding])


@pytest.mark.parametrize(
    "name",
    ["synth A", "synth B", "synth B --shift 2", "phantom core", "crop with padding -3024"],
)
def test_hu_crops_inside_the_body_stay_hu(name: str) -> None:
    """No outside air (bowel gas at most): fat and soft tissue in HU."""
    if name == "phantom core":
        crop = ct_phantom(0, (16, 64, 64)).astype(np.float32)[:, 26:38, 26:38]
    elif name == "crop with padding -3024":
        crop = padded(centre_crop(synth("A")), -3024.0)
    else:
        crop = centre_crop(WHOLE[name]())
    told = intensity_calibration(crop)
    assert (told.verdict, told.scale, told.offset) == ("hu", 1.0, 0.0), told


def fat_free_crop(low: float, high: float, share: float) -> np.ndarray:
    """A HU crop (16 x 16 x 16) of water-like tissue at ``low`` with a bright cluster
    (contrast or bone) at ``high`` over ``share`` of it, noise 12 HU, and no fat."""
    rng = np.random.default_rng(0)
    crop = low + rng.normal(0.0, 12.0, (16, 16, 16))
    crop[:, : int(16 * share)] = high + rng.normal(0.0, 12.0, (16, int(16 * share), 16))
    return np.round(crop)


@pytest.mark.parametrize(
    ("low", "high", "share"), [(0.0, 125.0, 0.25), (10.0, 125.0, 0.125), (20.0, 250.0, 0.125)]
)
def test_hu_crops_that_look_like_air_and_body_under_a_map_stay_hu(
    low: float, high: float, share: float
) -> None:
    """Under (HU + 1024) / 8 or / 4 the two modes of these crops would be air and body;
    the negative values of their water's noise (stored CT numbers are not) keep them HU."""
    told = intensity_calibration(fat_free_crop(low, high, share))
    assert (told.verdict, told.scale) == ("hu", 1.0), told


def test_a_crop_of_muscle_and_bone_is_unknown_not_corrected() -> None:
    """Muscle (40 HU) and bone (500 HU), no fat: HU without air, or (HU + 1024) / 2 (air
    at 40, body at 500) of a whole scan; / 2 is never corrected, so the scan is refused,
    naming both readings, and not silently read as either."""
    told = intensity_calibration(fat_free_crop(40.0, 500.0, 0.125))
    assert told.verdict == "unknown", told
    assert "HU without air or HU = 2 * value - 1024" in told.describe(), told.describe()


def _unclear() -> dict[str, tuple[Callable[[], np.ndarray], str | None]]:
    def normalised() -> np.ndarray:
        hu = synth("A")
        return (hu - hu.min()) / (hu.max() - hu.min())

    def z_scored() -> np.ndarray:
        hu = synth("B")
        return (hu - hu.mean()) / hu.std()

    def window_export() -> np.ndarray:  # a soft-tissue window (-160, 240) as 8 bits
        return np.round(np.clip((synth("A") + 160.0) / 400.0, 0, 1) * 255).astype(np.uint8)

    return {
        "normalised to [0, 1]": (normalised, None),
        "z-scored": (z_scored, None),
        "soft-tissue window as uint8": (window_export, "clipped at their minimum 0"),
        "(HU + 1024) * 2 (slope 0.5 dropped)": (
            lambda: (synth("A") + RAW) * 2,
            "HU = 0.5 * value - 1024",
        ),
        "(HU + 1024) / 2": (lambda: np.floor((synth("A") + RAW) / 2), "HU = 2 * value - 1024"),
        "(HU + 1024) * 8": (lambda: (synth("B") + RAW) * 8, None),
        "HU + 400": (lambda: synth("A") + 400, None),
    }


@pytest.mark.parametrize("name", list(_unclear()))
def test_what_cannot_be_told_is_unknown(name: str) -> None:
    make, note = _unclear()[name]
    values = make()
    told = intensity_calibration(values)
    assert (told.verdict, told.scale, told.offset) == ("unknown", None, None), told
    if note is not None:
        assert note in told.describe(), told.describe()
    same, _, applied = calibrate(values, CFG)  # used as it is
    assert same is values and applied == (1.0, 0.0)


def test_a_real_slice_whose_air_is_not_at_minus_1000_is_not_corrected(tmp_path: Path) -> None:
    """pydicom's CT_small.dcm (a real abdominal slice) stored as (HU + 1024) / 8: its
    background sits near -800 HU, so (HU + 1024) / 8 fits only loosely and HU without air
    fits too: unknown, naming both, rather than a guess either way."""
    hu = io.read_volume(write_ct_series(tmp_path / "hu", 4).folder).array
    told = intensity_calibration(stored_over(8)(hu))
    assert told.verdict == "unknown", told
    assert "HU without air or HU = 8 * value - 1024" in told.describe(), told.describe()


# --------------------------------------------------------------------------- training


def _restore(folder: Path, names: list[str], store: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrite the HU scans ``names`` of ``folder`` as ``store`` stores them."""
    for name in names:
        volume = io.read_volume(folder / name)
        write_volume(folder / name, store(volume.array), volume.geometry)


def test_train_corrects_a_scaled_weak_set_and_says_so_on_the_terminal(tmp_path: Path) -> None:
    """The weak set as (HU + 1024) / 8 uint8, the strong set as raw CT numbers: both are
    corrected, and both warnings are on the terminal (not only in train.log)."""
    weak, strong = dataset(tmp_path / "data", strong_offset=RAW)
    names = [f"w{i}.nii.gz" for i in range(6)]
    _restore(tmp_path / "data" / "weak", names, stored_over(8))
    # the same scans in HU, as the uint8 files hold them (the map applied by hand)
    for i, name in enumerate(names):
        hu = quantised(ct_phantom(i), 8.0, -1024.0, stored_over(8))
        write_volume(tmp_path / "hu" / name, hu, GEOMETRY)
    run = tmp_path / "run"
    code, output = cli(*train_args(weak, strong, run, config_yaml(tmp_path, strategy="multitask")))
    assert code == 0, output
    terminal = [line for line in output.splitlines() if line.startswith("lymphdx: warning:")]
    (weak_line,) = [line for line in terminal if "the weak set:" in line]
    (strong_line,) = [line for line in terminal if "the strong set:" in line]
    for word in ("the weak set", "6 of 6 scans", "(HU + 1024) / 8", "HU = 8 * value - 1024"):
        assert word in weak_line, (word, weak_line)
    assert all(f"'W{i}'" in weak_line for i in range(6))
    for word in ("the strong set", "2 of 2 scans", "raw CT numbers", "-1024", "'S0'", "'S1'"):
        assert word in strong_line, (word, strong_line)
    log_text = (run / "train.log").read_text()
    assert "HU = 8 * value - 1024" in log_text and "raw CT numbers" in log_text
    config = load_config(run / "config.yaml")
    trained = PreprocessCache(config.data.cache_dir, config.data)
    reference = PreprocessCache(tmp_path / "reference", config.data)
    for name in names:
        image = trained.image(tmp_path / "data" / "weak" / name)
        np.testing.assert_array_equal(image, reference.image(tmp_path / "hu" / name))
        told, offset = trained.calibration(tmp_path / "data" / "weak" / name)
        assert (told.verdict, told.scale, offset) == ("scaled", 8.0, -1024.0)


def test_a_scan_whose_calibration_cannot_be_told_is_refused_naming_the_patient(
    tmp_path: Path,
) -> None:
    weak, strong = dataset(tmp_path)
    volume = io.read_volume(tmp_path / "weak" / "w2.nii.gz")
    hu = volume.array
    write_volume(tmp_path / "weak" / "w2.nii.gz", (hu - hu.min()) / np.ptp(hu), volume.geometry)
    run = tmp_path / "run"
    code, output = cli(*train_args(weak, strong, run, config_yaml(tmp_path)))
    line = one_error(
        code, output, "the weak set", "1 of 6 scans", "cannot be told", "hu_scale", "hu_offset"
    )
    assert "patient 'W2'" in line and str(weak) in line and "'W0'" not in line
    assert "(HU + 1024) / 8" in line  # the maps it knows
    assert not run.exists() and not leftovers(tmp_path)


def test_hu_scale_key_gives_the_map_of_every_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hu = ct_phantom(4)
    scaled = write_volume(tmp_path / "s.nii.gz", stored_over(8)(hu), GEOMETRY)
    reference = write_volume(
        tmp_path / "hu.nii.gz", quantised(hu, 8.0, -1024.0, stored_over(8)), GEOMETRY
    )
    cfg = CFG.model_copy(update={"hu_scale": 8.0, "hu_offset": -1024.0})
    given = PreprocessCache(tmp_path / "cache", cfg)
    caplog.set_level(logging.WARNING, logger="lymphdx")
    assert check_calibration(given, {"weak": [("W0", scaled)]}) == {}  # nothing checked
    assert not caplog.records
    auto = PreprocessCache(tmp_path / "cache", CFG)
    np.testing.assert_array_equal(given.image(scaled), auto.image(reference))
    np.testing.assert_array_equal(given.image(scaled), auto.image(scaled))  # told alike
    # tenths of HU: hu_scale alone (hu_offset then 0)
    tenths = write_volume(tmp_path / "t.nii.gz", (hu.astype(np.int32) * 10), GEOMETRY)
    plain = write_volume(tmp_path / "p.nii.gz", hu, GEOMETRY)
    only_scale = PreprocessCache(tmp_path / "cache", CFG.model_copy(update={"hu_scale": 0.1}))
    np.testing.assert_allclose(only_scale.image(tenths), auto.image(plain), atol=1e-3)
    # the key follows the map; unset, it is what it was
    keys = {
        settings_key(CFG),
        settings_key(cfg),
        settings_key(CFG.model_copy(update={"hu_offset": -1024.0})),
        settings_key(CFG.model_copy(update={"hu_scale": 8.0})),
    }
    assert len(keys) == 4
    config = tiny_config(tmp_path, data={"hu_scale": 8, "hu_offset": -1024})
    assert yaml.safe_load(dump_config(config))["data"]["hu_scale"] == 8
    for bad in (0, -8, float("nan"), float("inf")):
        with pytest.raises(ConfigError) as err:
            load_config(overrides={"data": {"hu_scale": bad}})
        assert "data.hu_scale" in str(err.value) and "\n" not in str(err.value)


def test_an_entry_the_earlier_rule_made_is_remade_when_its_map_may_differ(
    tmp_path: Path,
) -> None:
    """The earlier rule read (HU + 1024) / 8 as HU without air: such an entry (and an
    unknown one) is remade; one read as HU with air, or raw, is kept as it is."""
    scaled = write_volume(tmp_path / "s.nii.gz", stored_over(8)(ct_phantom(5)), GEOMETRY)
    plain = write_volume(tmp_path / "p.nii.gz", ct_phantom(6), GEOMETRY)
    cache_ = PreprocessCache(tmp_path / "cache", CFG)
    right = np.array(cache_.image(scaled))
    kept = np.array(cache_.image(plain))
    for path, verdict, air in ((scaled, "hu", None), (plain, "hu", -995.0)):
        digest = cache_.content_hash(path)
        meta_path = tmp_path / "cache" / settings_key(CFG) / f"img-{digest}.json"
        meta = json.loads(meta_path.read_text())
        old = {"verdict": verdict, "air_mode": air, "body_mode": 5.0, "spread": 100.0}
        meta.update({"calibration": old, "hu_offset": 0.0})
        meta.pop("hu_scale")
        meta_path.write_text(json.dumps(meta))
        np.save(meta_path.with_suffix(".npy"), np.full_like(right, 7.0))  # marks the old array
    again = PreprocessCache(tmp_path / "cache", CFG)
    np.testing.assert_array_equal(again.image(scaled), right)
    assert again.calibration(scaled)[0].verdict == "scaled"
    np.testing.assert_array_equal(again.image(plain), np.full_like(kept, 7.0))  # not remade


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch supervised run on the small HU phantoms (seconds)."""
    from lymphdx.engine.train import train

    tmp = tmp_path_factory.mktemp("issue28_run")
    weak, strong = dataset(tmp)
    config = tiny_config(tmp, strategy="supervised", training={"epochs": 1, "device": "cpu"})
    train(config, tmp / "run", weak, strong, progress=False)
    return tmp / "run"


def test_predict_corrects_a_scaled_scan_and_lists_each_scans_warnings(
    run: Path, tmp_path: Path
) -> None:
    hu = ct_phantom(9, (32, 64, 64))
    store = stored_over(8)
    paths = {
        "hu": write_volume(tmp_path / "hu.nii.gz", quantised(hu, 8.0, -1024.0, store), PLAIN),
        "u8": write_volume(tmp_path / "u8.nii.gz", store(hu), PLAIN),
        "norm": write_volume(tmp_path / "norm.nii.gz", (hu - hu.min()) / float(np.ptp(hu)), PLAIN),
        "small": write_volume(
            tmp_path / "small.nii.gz",
            ct_phantom(7, (2, 80, 80)),
            Geometry((0.8, 0.8, 8.0), (0.0, 0.0, 0.0)),
        ),
    }
    out = tmp_path / "out"
    code, output = cli("predict", "--model", run, *paths.values(), "--out", out)
    assert code == 0, output
    saved = {k: json.loads((out / k / "prediction.json").read_text()) for k in paths}
    assert (saved["u8"]["hu_scale"], saved["u8"]["hu_offset"]) == (8.0, -1024.0)
    assert "HU = 8 * value - 1024" in saved["u8"]["calibration_warning"]
    assert "(HU + 1024) / 8" in saved["u8"]["calibration_warning"]
    assert saved["u8"]["probability"] == pytest.approx(saved["hu"]["probability"], abs=1e-6)
    assert (saved["hu"]["hu_scale"], saved["hu"]["calibration_warning"]) == (1.0, None)
    assert "cannot be told" in saved["norm"]["calibration_warning"]
    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None and reader.fieldnames[-1] == "warnings"
        rows = {Path(r["image"]).name.split(".")[0]: r for r in reader}
    assert all(row["status"] == "ok" for row in rows.values())
    assert rows["hu"]["warnings"] == ""
    assert "HU = 8 * value - 1024" in rows["u8"]["warnings"]
    assert "cannot be told" in rows["norm"]["warnings"]
    assert "fills only" in rows["small"]["warnings"]  # any per-scan warning, not just these
    assert "\n" not in "".join(r["warnings"] for r in rows.values())
