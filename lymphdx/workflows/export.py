"""``lymphdx export``: a run's inference network and its preprocessing, for use without
lymphdx's classes.

``export(run, out, fmt)`` writes into ``out`` (absent, empty, or an earlier export, which
is replaced; written beside under a temporary name, then renamed):

* ``torchscript``: ``model.ts`` (``torch.jit.trace`` of ``engine.export_net.ExportNet``)
  and ``export.json``;
* ``onnx``: ``model.onnx`` (``torch.onnx.export``, the dynamo exporter, opset 18, checked
  with ONNX Runtime) and ``export.json``; needs ``pip install 'lymphdx[export]'``;
* ``bundle``: a MONAI Bundle (``workflows.export_bundle``): ``configs/metadata.json``,
  ``configs/inference.json``, ``configs/export.json``, ``models/model.ts``,
  ``scripts/lymphdx_scan.py``, ``docs/README.md``, run by
  ``python -m monai.bundle run --config_file configs/inference.json --input_image SCAN``.

The network takes the prepared scan ``hu`` ``(1, 1, Z, Y, X)`` float32 (lymphdx's
``(z, y, x)`` order: HU on the working grid, clipped to the HU window) and returns
``probability`` ``(1,)`` (uncalibrated) and ``roi_prob`` ``(1, 1, Z, Y, X)``; the z-score,
the flip and the ROI readout are inside it. ``export.json`` says how to make ``hu`` from a
scan (spacing, shape, fit, window, calibration), and holds the thresholds, the calibration
(``RUN/calibration.json``, else ``"uncalibrated"``) and the checkpoint's SHA-256. Each
export is run once on a seeded scan-like input and compared with the network it came from
(``verification``; more than 1e-4 apart is an error).

Only runs scored by the whole-volume inferer (``evaluation.inferer: whole``: the quick and
paper presets) are exported; the clinical preset's sliding window is refused.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from lymphdx import __version__
from lymphdx.core.config import Config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import atomic_dir, folder_problem, write_json
from lymphdx.data.preprocess import load_normalizers
from lymphdx.engine.export_net import ExportNet
from lymphdx.engine.roi_readout import RoiReadout, run_readout
from lymphdx.engine.run_folder import load_model, load_run_config
from lymphdx.engine.run_state import refuse_while_busy

__all__ = ["EXPORT_FORMAT_VERSION", "FORMATS", "export", "export_settings", "require_extra"]

FORMATS = ("torchscript", "onnx", "bundle")
EXPORT_FORMAT_VERSION = 1
TOLERANCE = 1e-4  # exported outputs against the network they came from
ONNX_OPSET = 18


def require_extra(*modules: str) -> None:
    """Import ``modules`` or fail with the install line of the ``export`` extra."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise LymphdxError(
                f"export needs the Python package {name!r}, which is not installed: "
                "pip install 'lymphdx[export]' (onnx, onnxruntime, onnxscript, fire)"
            ) from None


def _calibration(run_dir: Path, config: Config) -> dict[str, Any]:
    """The threshold, operating point and calibration map of the run: those of
    ``RUN/calibration.json`` when it exists, else ``evaluation.threshold`` uncalibrated."""
    path = run_dir / "calibration.json"
    if not path.is_file():
        return {
            "calibration": "uncalibrated",
            "threshold": config.evaluation.threshold,
            "operating_point": None,
        }
    try:
        calibration = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LymphdxError(f"{path} cannot be read as JSON: {err}") from None
    point = calibration.get("operating_point") if isinstance(calibration, dict) else None
    threshold = (point or {}).get("threshold", calibration.get("threshold"))
    return {
        "calibration": calibration,
        "threshold": config.evaluation.threshold if threshold is None else float(threshold),
        "operating_point": point,
    }


def export_settings(
    run_dir: Path, config: Config, state: dict[str, Any], domain: str, mean: float, std: float
) -> dict[str, Any]:
    """``export.json`` less the format's own fields: the network's input and outputs, how
    to prepare a scan for it, and the decision thresholds."""
    x, y, z = config.data.shape  # type: ignore[misc]
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "lymphdx_version": __version__,
        "torch_version": torch.__version__,
        "monai_version": monai.__version__,
        "run": str(run_dir.resolve()),
        "checkpoint": state["source"],
        "strategy": config.strategy,
        "preset": config.preset,
        "input": {
            "name": "hu",
            "dtype": "float32",
            "axes": ["batch", "channel", "z", "y", "x"],
            "shape": [1, 1, z, y, x],
            "shape_rule": "data.shape (x, y, z) reversed, after one batch and one channel axis",
            "content": "the scan in Hounsfield units resampled (linear, outside = the "
            "window's low end) onto the working grid and clipped to hu_window: lymphdx's "
            "PreparedScan.array (lymphdx.data.scan_prep.prepare_scan)",
        },
        "outputs": {
            "probability": {"shape": [1], "dtype": "float32", "calibrated": False},
            "roi_prob": {"shape": [1, 1, z, y, x], "dtype": "float32", "axes": "as the input"},
        },
        "preprocessing": {
            "spacing": list(config.data.spacing),
            "shape": list(config.data.shape),  # type: ignore[arg-type]
            "fit": config.data.fit,
            "grid": "identity direction (LPS), centred on the centre of the scan's field of "
            "view; spacing (crop: centre-crop or pad) or the field of view's extent / shape "
            "(resize)",
            "hu_window": list(config.data.hu_window),
            "hu_scale": config.data.hu_scale,
            "hu_offset": config.data.hu_offset,
            "intensity_calibration": "HU = hu_scale * value + hu_offset when set, else told "
            "per scan (lymphdx.data.calibration)",
            "interpolation": "linear (SimpleITK), back to the scan's grid linear too",
        },
        # the DataConfig fields that prepare_scan reads (the bundle's scripts rebuild it)
        "data": config.data.model_dump(
            mode="json", include={"spacing", "shape", "fit", "hu_window", "hu_scale", "hu_offset"}
        ),
        "normalisation": {
            "domain": domain,
            "mean": mean,
            "std": std,
            "formula": "(hu - mean) / std, inside the network",
        },
        "tta_flip": bool(config.evaluation.tta_flip),
        "roi_threshold": config.propagation.roi_threshold,
        **_calibration(run_dir, config),
    }


def _example(shape: list[int], window: tuple[float, float], seed: int) -> torch.Tensor:
    """A seeded scan-like input: smooth blobs across the HU window."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = window
    coarse = torch.rand([1, 1] + [max(2, s // 4) for s in shape[2:]], generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="trilinear")
    return (lo + (hi - lo) * smooth).float()


def _difference(a: tuple[Any, Any], b: tuple[Any, Any]) -> dict[str, float]:
    return {
        name: float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
        for name, x, y in zip(("probability", "roi_prob"), a, b, strict=True)
    }


def _check(diff: dict[str, float], what: str) -> dict[str, float]:
    if max(diff.values()) > TOLERANCE:
        raise LymphdxError(f"the {what} differs from lymphdx's network by {diff} (> {TOLERANCE})")
    return diff


def _write_torchscript(net: ExportNet, example: torch.Tensor, path: Path) -> dict[str, float]:
    with warnings.catch_warnings():  # torch.jit's deprecation and tracer notes
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return _check(_difference(net(example), loaded(example)), "TorchScript file")


def _write_onnx(net: ExportNet, example: torch.Tensor, path: Path) -> dict[str, float]:
    import onnx
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["hu"],
            output_names=["probability", "roi_prob"],
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = net(example)
    return _check(_difference(want, session.run(None, {"hu": example.numpy()})), "ONNX file")


def _check_out(out: Path) -> None:
    """``out`` must be absent, an empty folder, or an earlier export (replaced)."""
    problem = folder_problem(out)
    if problem is not None:
        raise LymphdxError(f"cannot write the export to {str(out)!r}: {problem}")
    if not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    earlier = "export.json" in names or (out / "configs" / "export.json").is_file()
    if names and not earlier:
        raise LymphdxError(
            f"{out} holds other files; give an empty or new folder (an earlier export "
            "there is replaced)"
        )


def export(
    run_dir: str | Path,
    out: str | Path,
    fmt: str,
    domain: str = "weak",
    which: str = "best",
    seed: int = 0,
) -> dict[str, Any]:
    """Export run ``run_dir``'s ``which`` weights as ``fmt`` (``FORMATS``) into ``out``
    (module docstring); ``domain``: the hospital whose z-score (and domain batch norm)
    the scans get, as ``predict --domain``. Returns ``export.json``'s content.

    Raises:
        LymphdxError: an unknown format or domain, not a run folder, a sliding-window
            run, a missing ``export`` extra, or an export that differs from the network.
    """
    if fmt not in FORMATS:
        raise LymphdxError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_extra("onnx", "onnxruntime", "onnxscript")
    run_dir, out = Path(run_dir), Path(out)
    config = load_run_config(run_dir)  # "not a lymphdx run folder" before anything else
    if config.evaluation.inferer != "whole":
        raise LymphdxError(
            f"{run_dir} is scored by evaluation.inferer: {config.evaluation.inferer} (the "
            "clinical preset: a sliding window, and a classifier on a bag of tiles at the ROI "
            "map's peaks); export supports whole-volume runs only (evaluation.inferer: whole, "
            "the quick and paper presets). Use lymphdx predict for this run"
        )
    _check_out(out)
    refuse_while_busy(run_dir, "export it")
    config, model, state = load_model(run_dir, which)
    readout, readout_note = run_readout(run_dir, config, model, which=which)
    if readout is not None and not isinstance(readout, RoiReadout):
        raise LymphdxError(
            f"{run_dir} reads its ROI map with evaluation.readout: {readout.kind} (connected "
            "regions, measured node by node), which a traced network cannot hold; export "
            "supports evaluation.readout: map. Use lymphdx predict for this run"
        )
    normalizers = load_normalizers(run_dir / "normalization.json")
    if domain not in normalizers:
        raise LymphdxError(f"unknown domain {domain!r}; the run has {sorted(normalizers)}")
    norm = normalizers[domain]
    net = ExportNet(
        model,
        norm,
        STRONG if domain == "strong" else WEAK,
        config.evaluation.tta_flip,
        readout,
    )
    settings = export_settings(run_dir, config, state, domain, norm.mean, norm.std)
    settings["roi_readout"] = readout_note
    example = _example(settings["input"]["shape"], config.data.hu_window, seed)
    with atomic_dir(out) as tmp:
        if fmt == "bundle":
            from lymphdx.workflows.export_bundle import write_bundle

            (tmp / "models").mkdir()
            diff = _write_torchscript(net, example, tmp / "models" / "model.ts")
            settings |= {"format": "bundle", "file": "models/model.ts", "verification": diff}
            write_bundle(tmp, settings, run_dir)
            write_json(tmp / "configs" / "export.json", settings)
        else:
            name = "model.ts" if fmt == "torchscript" else "model.onnx"
            writer = _write_torchscript if fmt == "torchscript" else _write_onnx
            diff = writer(net, example, tmp / name)
            settings |= {"format": fmt, "file": name, "verification": diff}
            if fmt == "onnx":
                settings["onnx_opset"] = ONNX_OPSET
            write_json(tmp / "export.json", settings)
    return settings
