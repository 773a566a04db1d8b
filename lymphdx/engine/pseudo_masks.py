"""Pseudo ROI masks that know what they do not know: ignore bands, gates and a curriculum.

The paper's weak-set pseudo mask is ``s̃_ζ = [g(f(v)) > ζ]`` on every voxel of every scan.
Here each pseudo mask comes with voxel weights:

* an ignore band: voxels the decoder is unsure about (``ignore_low ≤ p ≤ ζ``) get weight
  0 instead of being trained towards background;
* a classifier gate: a scan the classifier calls negative (``σ(f(v)) < cls_gate``) does
  not contribute its pseudo mask at all;
* a curriculum (``curriculum_keep``): the most confident share of pseudo-labels first,
  growing every propagation round (Cascante-Bonilla et al., AAAI 2021).

``RoiLoss`` (BCE + batch soft Dice, ``losses``) takes those weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lymphdx.core.zeta import roi_mask

__all__ = ["pseudo_mask_targets", "curriculum_keep"]

Array = np.ndarray | torch.Tensor


def pseudo_mask_targets(
    prob: Array,
    zeta: float,
    ignore_low: float | None = None,
    cls_prob: Array | None = None,
    cls_gate: float | None = None,
) -> tuple[Array, Array]:
    """Pseudo masks and voxel weights from decoder probabilities ``prob`` ``(N, D, H, W)``.

    Returns ``(targets, weights)``: ``targets = prob > zeta`` (uint8, ``(N, D, H, W)``) and
    float32 weights of the same shape, 1 except

    * ``ignore_low`` given: 0 where ``ignore_low ≤ prob ≤ zeta`` (the unsure band);
    * ``cls_prob`` ``(N,)`` and ``cls_gate`` given: 0 on every voxel of scan ``n`` when
      ``cls_prob[n] < cls_gate`` (its pseudo mask is not used).

    NumPy in → NumPy out, torch in → torch out (on ``prob``'s device).
    """
    if not 0.0 <= zeta <= 1.0:
        raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
    if ignore_low is not None and ignore_low > zeta:
        raise ValueError(f"ignore_low ({ignore_low}) must not exceed zeta ({zeta})")
    if (cls_prob is None) != (cls_gate is None):
        raise ValueError("the classifier gate needs both cls_prob and cls_gate")
    as_numpy = isinstance(prob, np.ndarray)
    p = torch.as_tensor(prob)
    if p.dim() < 1:
        raise ValueError("prob must have shape (N, D, H, W)")
    targets = roi_mask(p, zeta).to(torch.uint8)
    weights = torch.ones(p.shape, dtype=torch.float32, device=p.device)
    if ignore_low is not None:
        weights[(p >= ignore_low) & (p <= zeta)] = 0.0
    if cls_prob is not None and cls_gate is not None:
        c = torch.as_tensor(cls_prob, device=p.device).reshape(-1)
        if len(c) != len(p):
            raise ValueError(f"cls_prob has {len(c)} scans, prob has {len(p)}")
        weights[c < cls_gate] = 0.0
    if as_numpy:
        return targets.numpy(), weights.numpy()
    return targets, weights


def curriculum_keep(
    confidence: Array, round_index: int, start: float = 0.2, step: float = 0.2
) -> Array:
    """Admit the most confident ``min(1, start + round_index·step)`` share of pseudo-labels.

    ``confidence`` ``(N,)`` (higher = surer, e.g. ``|2p − 1|``); returns a bool mask ``(N,)``
    with ``ceil(share·N)`` entries set (so round 0 admits at least one when ``start > 0``).
    Ties are broken by index (lower first); NaN counts as least confident. NumPy in →
    NumPy out, torch in → torch out.
    """
    if round_index < 0:
        raise ValueError(f"round_index must be ≥ 0, got {round_index}")
    if not 0.0 <= start <= 1.0 or step < 0:
        raise ValueError(f"need 0 ≤ start ≤ 1 and step ≥ 0, got start={start}, step={step}")
    as_torch = isinstance(confidence, torch.Tensor)
    conf = (
        confidence.detach().cpu().double().numpy()
        if as_torch
        else np.asarray(confidence, dtype=np.float64)
    ).reshape(-1)
    n = len(conf)
    share = min(1.0, start + round_index * step)
    count = min(n, math.ceil(round(share * n, 9)))
    conf = np.where(np.isnan(conf), -np.inf, conf)
    order = np.lexsort((np.arange(n), -conf))  # by confidence descending, then index
    keep = np.zeros(n, dtype=bool)
    keep[order[:count]] = True
    if as_torch:
        return torch.from_numpy(keep).to(confidence.device)
    return keep
