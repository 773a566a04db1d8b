"""ζ: the one rule that turns the decoder's ROI probabilities into a mask.

The paper's pseudo ROI mask is s̃_ζ = [g(f(v)) > ζ] (``propagation.roi_threshold``). The
same rule makes the strong-validation Dice of training, the Dice of ``evaluate``'s
detection report, the pseudo masks of propagation and ``predict``'s ``roi_mask.nii.gz``,
so that they all mean one mask.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["roi_mask"]

A = TypeVar("A", np.ndarray, torch.Tensor)


def roi_mask(prob: A, zeta: float) -> A:
    """Boolean ROI mask of probabilities ``prob`` (any shape, NumPy or torch): strictly
    above ``zeta``, so a voxel at exactly ζ is background."""
    return prob > zeta
