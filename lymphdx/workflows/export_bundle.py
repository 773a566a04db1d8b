"""The MONAI Bundle of ``lymphdx export --format bundle``: its configs, scripts and README.

The bundle follows MONAI's bundle specification (``configs/metadata.json``,
``configs/inference.json``, ``models/model.ts``, ``docs/README.md``) and runs with MONAI's
own runner from the bundle's folder::

    python -m monai.bundle run --config_file configs/inference.json --input_image SCAN

(``--bundle_root DIR`` from elsewhere; ``--output_dir DIR``, default ``eval``). The
preprocessing is lymphdx's own ``prepare_scan`` through the bundle-local
``scripts/lymphdx_scan.py`` (``workflows.bundle_scripts``), not MONAI transforms set to
imitate it (the HU calibration check, the centred grid, SimpleITK's resample), so that
the two cannot drift apart; the bundle therefore needs lymphdx installed, and ``fire``
for MONAI's command line.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.files import write_json, write_text
from lymphdx.workflows import bundle_scripts

__all__ = ["inference_config", "metadata", "write_bundle"]

# MONAI model-zoo bundles' configs/logging.conf: INFO lines on stdout
LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

PAPER = (
    "Glaser et al., Semi-supervised multi-domain multi-task training for metastatic colon "
    "lymph node diagnosis from abdominal CT, ISBI 2020 (arXiv 1910.10371)"
)


def inference_config() -> dict[str, Any]:
    """``configs/inference.json``: MONAI's config syntax (``@`` references, ``$``
    expressions, ``_target_`` components)."""
    scan = "scripts.lymphdx_scan"
    return {
        "imports": ["$import os", "$import importlib", "$import torch"],
        # imported when first used: MONAI's runner puts the bundle's folder (the one above
        # configs/) on sys.path just before it runs, after the imports above
        "scan": f"$importlib.import_module('{scan}')",
        "bundle_root": "$os.path.dirname(os.path.dirname(@scan.__file__))",
        "input_image": "",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "settings": "$@scan.read_settings(@bundle_root + '/configs/export.json')",
        "datalist": "$@scan.datalist(@input_image)",
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": f"{scan}.PrepareScand", "keys": "image", "settings": "@settings"}
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": f"{scan}.SaveOutputsd",
                    "output_dir": "@output_dir",
                    "settings": "@settings",
                }
            ],
        },
        "run": [
            "$@scan.run(@datalist, @preprocessing, @network, @inferer, @postprocessing, @device)"
        ],
    }


def _metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: m[k] for k in ("split", "n", "n_pos", "auc", "auc_ci95") if k in m}


def metadata(settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's bundle metadata schema."""
    import SimpleITK

    shape = settings["input"]["shape"]
    version = "0.1.0"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": version,
        "changelog": {version: f"exported by lymphdx {settings['lymphdx_version']}"},
        "monai_version": settings["monai_version"],
        "pytorch_version": settings["torch_version"].split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "lymphdx": settings["lymphdx_version"],
            "SimpleITK": SimpleITK.Version.VersionString(),
            "fire": "any",
        },
        "name": f"lymphdx {settings['strategy']} ({settings['preset']} preset)",
        "task": "Metastatic lymph node probability and lymph node ROI map from abdominal CT",
        "description": (
            f"lymphdx's {settings['strategy']} model exported from {settings['run']} "
            f"(checkpoint {settings['checkpoint']['file']}, sha256 "
            f"{settings['checkpoint']['sha256']}). Input: the scan prepared by lymphdx "
            "(HU on the working grid); outputs: the probability of metastatic lymph nodes "
            "(uncalibrated) and the ROI probability map, written on the scan's own grid."
        ),
        "authors": "lymphdx export; the model's training run",
        "copyright": "the owners of the training run's data and weights",
        "data_source": "the run's weak (scan labels) and strong (ROI masks) training sets",
        "data_type": "nifti (any scan SimpleITK reads, or a DICOM series folder)",
        "image_classes": "single-channel CT, Hounsfield units",
        "label_classes": "probability: metastatic lymph nodes present; roi_prob: lymph node",
        "pred_classes": "probability in [0, 1]; roi_prob voxel-wise in [0, 1]",
        "eval_metrics": _metrics(run_dir),
        "intended_use": "research only; not for clinical decisions",
        "references": [PAPER],
        "system": {"python": platform.python_version()},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": shape[2:],
                    "axes": "z, y, x (lymphdx's order)",
                    "dtype": "float32",
                    "value_range": settings["preprocessing"]["hu_window"],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "probability": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "metastatic lymph nodes"},
                },
                "roi_prob": {
                    "type": "image",
                    "format": "probabilities",
                    "num_channels": 1,
                    "spatial_shape": shape[2:],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "lymph node"},
                },
            },
        },
    }


def readme(settings: dict[str, Any]) -> str:
    """``docs/README.md``: what the bundle holds and how to run it."""
    prep = settings["preprocessing"]
    calibration = (
        "not calibrated: `configs/export.json` holds the run's calibration; apply it, then "
        "the threshold (the label is left empty)"
        if settings["calibration"] != "uncalibrated"
        else "the model's own (the run has no calibration)"
    )
    return f"""# lymphdx bundle: {settings["strategy"]} ({settings["preset"]} preset)

Exported by lymphdx {settings["lymphdx_version"]} from `{settings["run"]}`
(`{settings["checkpoint"]["file"]}`, sha256 `{settings["checkpoint"]["sha256"]}`).
Research use only.

## Run

Needs lymphdx (`pip install lymphdx`, which brings MONAI, PyTorch and SimpleITK) and
`fire` for MONAI's command line (`pip install 'lymphdx[export]'` has both). From this
folder:

```bash
python -m monai.bundle run --config_file configs/inference.json --input_image scan.nii.gz
```

`--input_image` takes a NIfTI, NRRD or MetaImage file or a DICOM series folder (or a list,
`--input_image "['a.nii.gz','b.nii.gz']"`); `--output_dir DIR` (default `eval`);
`--bundle_root DIR` when run from another folder. Per scan, `OUTPUT_DIR/<name>/`:
`roi_prob.nii.gz` (float32) and `roi_mask.nii.gz` (probability > ζ =
{settings["roi_threshold"]}) on the scan's own grid, and `prediction.json` (`probability`,
`label`, `threshold` {settings["threshold"]}). They equal `lymphdx predict`'s to 1e-4.

## What it does

1. `scripts/lymphdx_scan.py` prepares the scan with lymphdx's `prepare_scan`: values to
   Hounsfield units, one linear resample onto a {prep["shape"]} (x, y, z) grid at
   {prep["spacing"]} mm (`fit: {prep["fit"]}`), identity direction, centred on the scan's
   field of view, clipped to {prep["hu_window"]} HU.
2. `models/model.ts` (TorchScript) takes that array `(1, 1, z, y, x)` and returns the
   probability `(1,)` and the ROI map `(1, 1, z, y, x)`: the z-score of the
   {settings["normalisation"]["domain"]} hospital, the network
   {"averaged with its left-right flip, " if settings["tta_flip"] else ""}and the ROI
   readout ({settings["roi_readout"]}) are inside it.
3. The ROI map is resampled back onto the scan's grid (linear) and written.

The probability is {calibration}.
`configs/export.json` lists everything the network needs of a scan.
"""


def write_bundle(folder: Path, settings: dict[str, Any], run_dir: Path) -> None:
    """Write the bundle's configs, scripts and README into ``folder`` (``models/model.ts``
    and ``configs/export.json`` are the caller's)."""
    write_json(folder / "configs" / "metadata.json", metadata(settings, run_dir))
    write_json(folder / "configs" / "inference.json", inference_config())
    write_text(folder / "scripts" / "__init__.py", "")
    source = Path(bundle_scripts.__file__).read_text()
    write_text(folder / "scripts" / "lymphdx_scan.py", source)
    write_text(folder / "configs" / "logging.conf", LOGGING)
    write_text(folder / "docs" / "README.md", readme(settings))
