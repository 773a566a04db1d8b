"""One trained run made ready to score new scans: ``RunScorer``, shared by ``predict`` (one
run) and ``workflows.ensemble`` (several runs averaged).

A scan is prepared with the run's ``data`` settings (``data.scan_prep.prepare_scan``, the
preparation training's cache used), z-scored with the run's normaliser of the hospital it
comes from, scored by the run's inferer (``evaluation.inferer``, with the flip when
``evaluation.tta_flip``), averaged with the run's ROI readout when
``evaluation.roi_readout``, and calibrated with the run's ``calibration.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphdx.core.config import Config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.data.preprocess import Normalizer, load_normalizers
from lymphdx.data.scan_prep import PreparedScan, prepare_scan
from lymphdx.engine.inferer import Inferer, make_inferer
from lymphdx.engine.roi_readout import Readout, run_readout
from lymphdx.engine.run_folder import load_model
from lymphdx.models.domain_norm import domains
from lymphdx.stats.calibration import Recalibration
from lymphdx.workflows.calibrate import read_run_calibration

__all__ = ["RunScorer", "ScanScore"]

log = logging.getLogger("lymphdx")


@dataclass(frozen=True)
class ScanScore:
    """One run's scores of one scan: the classifier's probability, the uncalibrated
    probability (the classifier's, or its mean with the ROI readout), the calibrated one
    (the run's ``calibration.json``), and the ROI map ``(z, y, x)`` float32 on the scan's
    working grid (``PreparedScan.grid``)."""

    classifier: float
    uncalibrated: float
    probability: float
    roi: np.ndarray


@dataclass
class RunScorer:
    """A run's model, normaliser, inferer, readout and calibration (``load``)."""

    run_dir: Path
    config: Config
    model: torch.nn.Module
    state: dict[str, Any]
    domain: str
    normalizer: Normalizer
    inferer: Inferer
    readout: Readout | None
    readout_note: str
    recalibration: Recalibration
    calibration: dict[str, Any] | None
    calibration_note: str | None

    @classmethod
    def load(cls, run_dir: str | Path, domain: str = "weak", which: str = "best") -> RunScorer:
        """The run's ``which`` weights; ``domain``: the hospital the scans come from
        (``weak`` or ``strong``), whose z-score and domain batch norm are used."""
        config, model, state = load_model(run_dir, which)
        # evaluation.roi_readout: fitted once on the run's weak training patients and kept
        readout, readout_note = run_readout(run_dir, config, model, which=which)
        # evaluation.calibration / operating_point: fitted by evaluate on validation patients
        recalibration, calibration, note = read_run_calibration(run_dir, which)
        normalizers = load_normalizers(Path(run_dir) / "normalization.json")
        if domain not in normalizers:
            raise LymphdxError(f"unknown domain {domain!r}; the run has {sorted(normalizers)}")
        return cls(
            Path(run_dir),
            config,
            model,
            state,
            domain,
            normalizers[domain],
            make_inferer(config),
            readout,
            readout_note,
            recalibration,
            calibration,
            note,
        )

    def warn_calibration(self) -> None:
        """Log why the run's probabilities are not calibrated, or its calibration's warning."""
        if self.calibration_note is not None:
            log.warning("%s", self.calibration_note)
        elif self.calibration is not None and self.calibration["warning"]:
            log.warning(
                "%s: calibration and threshold %s", self.run_dir, self.calibration["warning"]
            )

    def prepare(
        self, image_path: Path, patient: str | None = None, series_uid: str | None = None
    ) -> PreparedScan:
        """The scan read and prepared with the run's ``data`` settings (notes logged)."""
        scan = prepare_scan(image_path, self.config.data, patient, series_uid)
        for note in scan.notes:
            log.warning("%s: %s", image_path, note)
        return scan

    @torch.no_grad()
    def score(self, scan: PreparedScan) -> ScanScore:
        """Score a scan prepared with this run's ``data`` settings (``prepare``)."""
        image = torch.from_numpy(self.normalizer(scan.array))[None, None]  # (1, 1, D, H, W)
        flips = bool(self.config.evaluation.tta_flip)
        with domains(self.model, STRONG if self.domain == "strong" else WEAK):  # DSBN
            out = {k: v.cpu() for k, v in self.inferer(self.model, image, flips=flips).items()}
        classifier = float(out["cls"][0])
        uncalibrated = classifier
        if self.readout is not None:  # the mean of the classifier and the ROI map's regression
            features = self.readout.read(out["roi"], image)
            uncalibrated = float(self.readout.combine(np.array([classifier]), features)[0])
        probability = float(self.recalibration(np.array([uncalibrated]))[0])
        roi = out["roi"][0, 0].numpy().astype(np.float32)
        return ScanScore(classifier, uncalibrated, probability, roi)
