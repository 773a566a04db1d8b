"""The ``scripts/lymphdx_scan.py`` of a MONAI Bundle that ``lymphdx export --format bundle``
writes: a copy of this file. MONAI's runner (``python -m monai.bundle run``) puts the
bundle's folder on ``sys.path``, so ``configs/inference.json`` reaches it as
``scripts.lymphdx_scan``. It needs lymphdx installed (``pip install lymphdx``): a scan is
prepared by lymphdx's own ``prepare_scan`` (reading, HU calibration, one SimpleITK
resample onto the working grid, the HU window) and the ROI map taken back onto the scan's
grid by ``PreparedScan.to_original``, so the bundle's outputs are ``lymphdx predict``'s.

Per scan ``OUTPUT_DIR/<name>/``: ``roi_prob.nii.gz`` (float32), ``roi_mask.nii.gz``
(uint8, probability > ζ) on the scan's own grid, and ``prediction.json``
(``probability``, ``label``, ``threshold``, ``roi_threshold``, the checkpoint's record).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from lymphdx.core.config import DataConfig
from lymphdx.core.files import write_json
from lymphdx.core.zeta import roi_mask
from lymphdx.data.scan_prep import prepare_scan
from lymphdx.io import volumes as io
from lymphdx.workflows.predict import output_name

__all__ = ["PrepareScand", "SaveOutputsd", "datalist", "read_settings", "run"]


def read_settings(path: str | Path) -> dict[str, Any]:
    """The export's ``export.json`` (what the network needs of a scan, and its thresholds)."""
    return json.loads(Path(path).read_text())


def datalist(images: str | Sequence[str]) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` of one scan path or a list of them; none is an error."""
    paths = [images] if isinstance(images, str | Path) else list(images)
    paths = [str(p) for p in paths if str(p)]
    if not paths:
        raise ValueError("no scan given: run with --input_image PATH (NIfTI, NRRD, MHA, DICOM)")
    return [{"image": p} for p in paths]


class PrepareScand(MapTransform):
    """``{key: path}`` → ``{key: (1, Z, Y, X) float32 HU on the working grid, clipped to
    the HU window; key + "_prepared": the PreparedScan}`` (lymphdx's ``prepare_scan``
    with the export's ``data`` settings)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        settings: Mapping[str, Any],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.data = DataConfig.model_validate(settings["data"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            scan = prepare_scan(d[key], self.data)
            d[f"{key}_path"] = str(d[key])
            d[f"{key}_prepared"] = scan
            d[key] = torch.from_numpy(scan.array)[None]
        return d


class SaveOutputsd(MapTransform):
    """Writes one scan's outputs (module docstring) from ``probability`` ``(1,)`` and
    ``roi_prob`` ``(1, 1, Z, Y, X)`` on the working grid, mapped back by the scan's
    ``image_prepared``."""

    def __init__(self, output_dir: str | Path, settings: Mapping[str, Any]) -> None:
        super().__init__(keys=("probability", "roi_prob"))
        self.output_dir = Path(output_dir)
        self.settings = settings

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scan = d["image_prepared"]
        zeta = float(self.settings["roi_threshold"])
        prob = scan.to_original(d["roi_prob"].detach().cpu().numpy()[0, 0].astype(np.float32))
        mask = roi_mask(prob, zeta).astype(np.uint8)
        folder = self.output_dir / output_name(Path(d["image_path"]))
        folder.mkdir(parents=True, exist_ok=True)
        io.write_volume(folder / "roi_prob.nii.gz", prob, scan.source.geometry)
        io.write_volume(folder / "roi_mask.nii.gz", mask, scan.source.geometry)
        probability = float(d["probability"].detach().cpu().reshape(-1)[0])
        calibrated = self.settings.get("calibration") != "uncalibrated"
        threshold = self.settings["threshold"]
        result = {
            "image": d["image_path"],
            "probability": probability,
            "probability_calibrated": False,
            # a calibrated export's threshold belongs to the calibrated probability
            "label": None if calibrated else int(probability > threshold),
            "label_note": (
                "apply export.json's calibration to the probability, then its threshold"
                if calibrated
                else None
            ),
            "threshold": threshold,
            "roi_threshold": zeta,
            "roi_max_probability": float(prob.max()),
            "roi_voxels": int(mask.sum()),
            "checkpoint": self.settings["checkpoint"],
            "strategy": self.settings["strategy"],
        }
        write_json(folder / "prediction.json", result)
        d["prediction"] = result
        return d


@torch.no_grad()
def run(
    data: Sequence[Mapping[str, Any]],
    preprocessing: Callable[[Any], dict[Hashable, Any]],
    network: torch.nn.Module,
    inferer: Callable[..., Any],
    postprocessing: Callable[[Any], dict[Hashable, Any]],
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Each scan of ``data`` through ``preprocessing``, the ``network`` (by ``inferer``)
    and ``postprocessing``; returns their ``prediction.json`` contents."""
    results = []
    for item in data:
        d = preprocessing(item)
        probability, roi = inferer(d["image"][None].to(device), network)
        d["probability"], d["roi_prob"] = probability, roi
        results.append(postprocessing(d)["prediction"])
        print(json.dumps(results[-1]))
    return results
