"""``lymphdx export``: TorchScript, ONNX (run by ONNX Runtime) and a MONAI Bundle (run by
MONAI's own ``python -m monai.bundle run``) give ``lymphdx predict``'s probability and
ROI map to 1e-4; ``export.json``; the errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.core.config import dump_config, load_config
from lymphdx.core.errors import LymphdxError
from lymphdx.data.preprocess import Normalizer
from lymphdx.data.scan_prep import prepare_scan
from lymphdx.engine import roi_readout as readout_module
from lymphdx.engine.export_net import ExportNet, readout_features_torch
from lymphdx.engine.roi_readout import FEATURES, RoiReadout, readout_features
from lymphdx.engine.run_folder import load_run_config
from lymphdx.engine.teacher import predict_with_tta
from lymphdx.models.domain_norm import domains
from lymphdx.models.multitask import build_model
from lymphdx.workflows.export import FORMATS, export
from lymphdx.workflows.predict import predict
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUICK_MODEL = {  # the quick preset's classifier and decoder options, on the tiny network
    "pool": "attention",
    "roi_evidence": "trained",
    "malignancy_map": True,
    "decoder_skips": True,
}


def _uncalibrated(prediction: dict) -> float:
    """prediction.json's uncalibrated probability (``probability`` in a run without a
    calibration)."""
    return float(prediction.get("probability_uncalibrated", prediction["probability"]))


@pytest.fixture(scope="module")
def exported(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 1-epoch multitask run with the quick preset's flip and ROI readout (the tiny
    decoder is taken to have learned, so the readout is fitted), predicted on two scans
    by ``lymphdx predict``; exported lazily per format."""
    tmp = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setattr(readout_module, "read_roi_status", lambda run: {"learned": True, "note": None})
    config = tiny_config(
        tmp,
        strategy="multitask",
        training={"epochs": 1},
        model=QUICK_MODEL,
        evaluation={"tta_flip": True, "roi_readout": True},
    )
    from lymphdx.engine.train import train

    run = tmp / "run"
    weak, strong = tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"
    train(config, run, weak, strong, progress=False)
    scans = [tiny_data / "weak/images/W0001.nii.gz", tiny_data / "strong/images/S0001.nii.gz"]
    predict(run, scans, tmp / "pred")
    cache: dict[str, tuple[Path, dict]] = {}

    def get(fmt: str) -> tuple[Path, dict]:
        if fmt not in cache:
            out = tmp / f"out_{fmt}"
            cache[fmt] = (out, export(run, out, fmt))
        return cache[fmt]

    yield run, scans, tmp / "pred", get
    mp.undo()


def _predicted(pred: Path, scan: Path) -> tuple[float, np.ndarray]:
    folder = pred / scan.name.removesuffix(".nii.gz")
    prediction = json.loads((folder / "prediction.json").read_text())
    roi = np.asarray(nib.load(folder / "roi_prob.nii.gz").dataobj, dtype=np.float32)
    return _uncalibrated(prediction), roi


def _nibabel_xyz(zyx: np.ndarray) -> np.ndarray:
    return np.transpose(zyx, (2, 1, 0))  # nibabel reads (x, y, z)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_network_gives_predicts_outputs(exported, fmt: str) -> None:
    """On two scans (one per hospital), the exported file run on lymphdx's prepared scan
    gives predict's probability, and its ROI map taken back to the scan's grid gives
    predict's roi_prob.nii.gz, to 1e-4 (ONNX through ONNX Runtime)."""
    run, scans, pred, get = exported
    out, settings = get(fmt)
    config = load_run_config(run)
    if fmt == "torchscript":
        module = torch.jit.load(str(out / "model.ts"))

        def call(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            p, r = module(torch.from_numpy(hu))
            return p.numpy(), r.numpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"))

        def call(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            p, r = session.run(["probability", "roi_prob"], {"hu": hu})
            return p, r

    for scan_path in scans:
        scan = prepare_scan(scan_path, config.data)
        hu = scan.array[None, None]
        assert list(hu.shape) == settings["input"]["shape"]
        probability, roi = call(hu)
        want_p, want_roi = _predicted(pred, scan_path)
        assert probability.shape == (1,) and roi.shape == hu.shape
        assert abs(float(probability[0]) - want_p) < 1e-4
        back = scan.to_original(roi[0, 0].astype(np.float32))
        np.testing.assert_allclose(_nibabel_xyz(back), want_roi, atol=1e-4, rtol=0)


def test_the_bundle_runs_in_monais_runner_and_gives_predicts_outputs(
    exported, tmp_path: Path
) -> None:
    """``python -m monai.bundle run --config_file configs/inference.json`` from another
    folder, on both scans (a list through --input_image): prediction.json's probability
    and roi_prob.nii.gz equal predict's to 1e-4, the mask is the map above ζ."""
    run, scans, pred, get = exported
    bundle, settings = get("bundle")
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 32, 32]
    assert set(meta["network_data_format"]["outputs"]) == {"probability", "roi_prob"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    listed = "[" + ",".join(f"'{s}'" for s in scans) + "]"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--input_image",
        listed,
        "--output_dir",
        str(tmp_path / "eval"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for scan_path in scans:
        folder = tmp_path / "eval" / scan_path.name.removesuffix(".nii.gz")
        got = json.loads((folder / "prediction.json").read_text())
        want_p, want_roi = _predicted(pred, scan_path)
        assert abs(got["probability"] - want_p) < 1e-4
        assert got["label"] == int(got["probability"] > settings["threshold"])
        roi = np.asarray(nib.load(folder / "roi_prob.nii.gz").dataobj, dtype=np.float32)
        np.testing.assert_allclose(roi, want_roi, atol=1e-4, rtol=0)
        mask = np.asarray(nib.load(folder / "roi_mask.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, (roi > settings["roi_threshold"]).astype(np.uint8))


def test_export_json_says_how_to_prepare_a_scan(exported) -> None:
    """export.json against the run's own files: the checkpoint's SHA-256 (hashlib on
    best.pt), the grid of config.yaml, the weak z-score of normalization.json, the
    thresholds, no calibration, and a verification under 1e-4."""
    run, _, _, get = exported
    out, settings = get("torchscript")
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk == json.loads(json.dumps(settings))
    config = yaml.safe_load((run / "config.yaml").read_text())
    norm = json.loads((run / "normalization.json").read_text())["weak"]
    sha = hashlib.sha256((run / "checkpoints" / "best.pt").read_bytes()).hexdigest()
    assert on_disk["checkpoint"]["sha256"] == sha
    assert on_disk["format"] == "torchscript" and on_disk["file"] == "model.ts"
    assert on_disk["input"]["axes"] == ["batch", "channel", "z", "y", "x"]
    assert on_disk["input"]["shape"] == [1, 1, 16, 32, 32]  # data.shape [32, 32, 16] reversed
    prep = on_disk["preprocessing"]
    assert prep["spacing"] == config["data"]["spacing"] and prep["fit"] == "crop"
    assert prep["hu_window"] == config["data"]["hu_window"]
    assert on_disk["normalisation"]["domain"] == "weak"
    assert on_disk["normalisation"]["mean"] == pytest.approx(norm["mean"])
    assert on_disk["normalisation"]["std"] == pytest.approx(norm["std"])
    assert on_disk["threshold"] == config["evaluation"]["threshold"]
    assert on_disk["roi_threshold"] == config["propagation"]["roi_threshold"] == 0.8
    assert on_disk["calibration"] == "uncalibrated" and on_disk["operating_point"] is None
    assert on_disk["tta_flip"] is True and on_disk["roi_readout"].startswith("fitted on")
    assert max(on_disk["verification"].values()) < 1e-4
    assert on_disk["strategy"] == "multitask" and on_disk["format_version"] == 1


def test_a_runs_calibration_json_travels_with_the_export(exported, tmp_path: Path) -> None:
    """With RUN/calibration.json the export holds its content and its operating point's
    threshold; the bundle's label is then left to the calibrated probability."""
    run, _, _, _ = exported
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    calibration = {"method": "platt", "operating_point": {"target": "youden", "threshold": 0.31}}
    (copy / "calibration.json").write_text(json.dumps(calibration))
    settings = export(copy, tmp_path / "out", "torchscript")
    assert settings["calibration"] == calibration
    assert settings["threshold"] == 0.31
    assert settings["operating_point"] == calibration["operating_point"]


def test_export_net_is_predicts_scoring_in_torch_ops() -> None:
    """Without a run: ExportNet on a random domain-batch-norm network routed to the strong
    hospital, with the flip and a readout, against predict's sequence (Normalizer,
    predict_with_tta under ``domains``, readout_features, RoiReadout.combine)."""
    torch.manual_seed(0)
    cfg = tiny_config(Path("unused"), model={**QUICK_MODEL, "norm": "domain_batch"})
    model = build_model(cfg.model).eval()
    rng = np.random.default_rng(0)
    n = len(FEATURES)
    readout = RoiReadout(
        rng.normal(size=n), rng.uniform(0.5, 2, size=n), rng.normal(size=n) * 0.3, 0.1, 9, 4, 0.8
    )
    norm = Normalizer(-40.0, 110.0)
    net = ExportNet(model, norm, domain=1, flips=True, readout=readout)
    hu = rng.uniform(-250, 350, size=(2, 1, 16, 32, 32)).astype(np.float32)
    image = torch.from_numpy(norm(hu))
    with torch.no_grad(), domains(model, 1):
        want = predict_with_tta(model, image, flips=True)
        got_p, got_roi = net(torch.from_numpy(hu))
    want_p = readout.combine(want["cls"].double().numpy(), readout_features(want["roi"], image))
    np.testing.assert_allclose(got_p.numpy(), want_p, atol=1e-6)
    torch.testing.assert_close(got_roi, want["roi"], atol=1e-7, rtol=0)
    with torch.no_grad():  # another domain's statistics give another output
        weak_roi = ExportNet(model, norm, domain=0)(torch.from_numpy(hu))[1]
    assert not torch.allclose(weak_roi, got_roi)


@pytest.mark.parametrize("shape", [(3, 1, 4, 6, 5), (1, 1, 2, 2, 3)])
def test_readout_features_in_torch_equal_numpys(shape: tuple[int, ...]) -> None:
    """The traced readings against ``readout_features`` (NumPy percentile, capped k)."""
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.uniform(0.001, 0.999, size=shape).astype(np.float32))
    images = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    np.testing.assert_allclose(
        readout_features_torch(maps, images).numpy(), readout_features(maps, images), rtol=1e-9
    )


def test_export_refuses_what_it_cannot_do(exported, tmp_path: Path) -> None:
    """Not a run folder; an unknown format (library and command line); a sliding-window
    run (the clinical preset); an output folder holding other files."""
    run, _, _, _ = exported
    with pytest.raises(LymphdxError, match="not a lymphdx run folder"):
        export(tmp_path, tmp_path / "out", "torchscript")
    with pytest.raises(LymphdxError, match="unknown export format 'tflite'.*torchscript"):
        export(run, tmp_path / "out", "tflite")
    result = CliRunner().invoke(app, ["export", str(run), "--format", "tflite", "--out", "x"])
    assert result.exit_code == 2 and "tflite" in result.output
    clinical = tmp_path / "clinical"
    clinical.mkdir()
    (clinical / "config.yaml").write_text(dump_config(load_config(preset="clinical")))
    with pytest.raises(LymphdxError, match="whole-volume runs only.*quick and paper"):
        export(clinical, tmp_path / "out", "bundle")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LymphdxError, match="holds other files"):
        export(run, busy, "torchscript")
    assert (busy / "notes.txt").read_text() == "mine"
    assert FORMATS == ("torchscript", "onnx", "bundle")


def test_onnx_without_the_extra_says_what_to_install(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _, _, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(LymphdxError, match=r"'onnxruntime'.*pip install 'lymphdx\[export\]'"):
        export(run, tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists()


def test_cli_export_writes_torchscript(exported, tmp_path: Path) -> None:
    run, _, _, _ = exported
    result = CliRunner().invoke(
        app, ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "ts")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["file"] == "model.ts"
    assert {p.name for p in (tmp_path / "ts").iterdir()} == {"model.ts", "export.json"}
