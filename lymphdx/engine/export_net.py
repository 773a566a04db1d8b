"""The inference network of a run as one module of torch operations, for ``lymphdx export``.

``ExportNet`` holds what ``predict`` does between the prepared scan and its outputs, so
that TorchScript (tracing) and ONNX can record it:

    hu (1, 1, Z, Y, X) float32   the prepared scan: HU on the run's working grid, clipped
                                 to ``data.hu_window`` (``PreparedScan.array[None, None]``;
                                 lymphdx's ``(z, y, x)`` axis order)
    → z-score of the chosen domain (``preprocess.Normalizer``)
    → ``MultiTaskNet`` in eval mode, its domain-specific batch norms routed to that domain,
      averaged with the left-right flip when the run uses it (``teacher.predict_with_tta``)
    → with a fitted ROI readout (``engine.roi_readout``), the mean of the classifier's
      probability and the readout's regression on the map's readings
    → (probability (1,), roi_prob (1, 1, Z, Y, X)), both float32

The probability is the uncalibrated one (``prediction.json``'s ``probability`` of a run
without a calibration). Only the whole-volume inferer (``evaluation.inferer: whole``) is
expressed here: the sliding window's classifier reads a variable bag of tiles at peaks
that scipy finds.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from lymphdx.data.preprocess import Normalizer
from lymphdx.engine.roi_readout import _EPS, FEATURES, IMAGE_K, TOP_K, RoiReadout
from lymphdx.models.domain_norm import DomainBatchNorm3d

__all__ = ["ExportNet", "readout_features_torch"]


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = torch.clamp(p, _EPS, 1.0 - _EPS)
    return torch.log(p / (1.0 - p))


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile ``(B,)`` of each row of ``x`` ``(B, k)``: linear
    interpolation between order statistics, with NumPy's rounding (``numpy.percentile``)."""
    k = x.shape[1]
    ordered = torch.sort(x, dim=1).values
    h = q / 100.0 * (k - 1)
    lo = int(np.floor(h))
    hi = min(lo + 1, k - 1)
    t = h - lo
    a, b = ordered[:, lo], ordered[:, hi]
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def readout_features_torch(roi: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``roi_readout.readout_features`` in torch operations: ``(B, F)`` float64 readings of
    ROI probabilities ``roi`` and the normalised images ``image``, both ``(B, 1, D, H, W)``,
    in ``FEATURES`` order. The sizes are fixed when traced (k is capped at the map's)."""
    flat = roi.float().flatten(1)
    img = image.float().flatten(1)
    k_max = min(max(max(TOP_K), max(IMAGE_K)), int(flat.shape[1]))
    top32, idx = flat.topk(k_max, dim=1)
    top = top32.double()
    under = img.gather(1, idx).double()
    cols = [_logit(top[:, : min(k, k_max)].mean(1)) for k in TOP_K]
    cols.append(_logit(top[:, 0]))
    cols.append(torch.log1p(flat.double().sum(1)))
    for k in IMAGE_K:
        w = top[:, : min(k, k_max)] + _EPS
        x = under[:, : min(k, k_max)]
        mean = (w * x).sum(1) / w.sum(1)
        cols.append(mean)
        cols.append(torch.sqrt((w * (x - mean[:, None]) ** 2).sum(1) / w.sum(1)))
        cols.append(_percentile(x, 10.0))
    return torch.stack(cols, dim=1)


class ExportNet(nn.Module):
    """A run's whole-volume inference: ``hu`` ``(1, 1, Z, Y, X)`` → ``(probability (1,),
    roi_prob (1, 1, Z, Y, X))`` (module docstring). Batches of several scans of the same
    shape work as well (``(B,)``, ``(B, 1, Z, Y, X)``).

    Args:
        model: the run's ``MultiTaskNet`` (copied; the copy is frozen in eval mode).
        normalizer: the z-score of the domain the scans come from.
        domain: that domain's id, routed to every ``DomainBatchNorm3d`` (0 weak, 1 strong).
        flips: average with the left-right flip (``evaluation.tta_flip``).
        readout: the run's fitted ROI readout, or None (the classifier alone).
    """

    def __init__(
        self,
        model: nn.Module,
        normalizer: Normalizer,
        domain: int = 0,
        flips: bool = False,
        readout: RoiReadout | None = None,
    ) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        for m in self.model.modules():
            if isinstance(m, DomainBatchNorm3d):
                m.routing = domain  # a fixed domain, whatever the caller's context
        for p in self.model.parameters():
            p.requires_grad_(False)
        # Normalizer.__call__'s float32 arithmetic: (x - mean) * (1 / std)
        self.register_buffer("norm_mean", torch.tensor(np.float32(normalizer.mean)))
        scale = np.float32(1.0 / max(normalizer.std, 1e-6))
        self.register_buffer("norm_scale", torch.tensor(scale))
        self.flips = bool(flips)
        self.has_readout = readout is not None
        self.readout_weight = float(readout.weight) if readout is not None else 0.5
        if readout is not None:
            if len(readout.coef) != len(FEATURES):
                raise ValueError(f"readout of {len(readout.coef)} features, not {len(FEATURES)}")
            self.register_buffer("readout_mean", torch.from_numpy(readout.mean.copy()))
            self.register_buffer("readout_scale", torch.from_numpy(readout.scale.copy()))
            self.register_buffer("readout_coef", torch.from_numpy(readout.coef.copy()))
            self.register_buffer(
                "readout_intercept", torch.tensor(float(readout.intercept), dtype=torch.float64)
            )
        self.eval()

    def normalise(self, hu: torch.Tensor) -> torch.Tensor:
        """The network's input ``(B, 1, Z, Y, X)``: the domain's z-score of ``hu``."""
        return (hu.float() - self.norm_mean) * self.norm_scale

    def forward(self, hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.normalise(hu)
        out = self.model(image, roi=True)
        cls = torch.sigmoid(out["cls"].float())
        roi = torch.sigmoid(out["roi"].float())
        if self.flips:  # as predict_with_tta: the flipped view's map flipped back
            mirrored = self.model(torch.flip(image, dims=(-1,)), roi=True)
            cls = (cls + torch.sigmoid(mirrored["cls"].float())) / 2
            roi = (roi + torch.flip(torch.sigmoid(mirrored["roi"].float()), dims=(-1,))) / 2
        if not self.has_readout:
            return cls, roi
        z = (readout_features_torch(roi, image) - self.readout_mean) / self.readout_scale
        readout = torch.sigmoid(z @ self.readout_coef + self.readout_intercept)
        return (
            (1 - self.readout_weight) * cls.double() + self.readout_weight * readout
        ).float(), roi
