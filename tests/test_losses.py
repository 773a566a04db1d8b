"""Loss values against hand-worked cases."""

from __future__ import annotations

import math

import torch

from lymphdx.engine.losses import RoiLoss, classification_loss


def test_bce_hand_worked() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # sigmoid: 0.5, 0.75
    targets = torch.tensor([1.0, 0.0])
    # -ln 0.5 = ln 2 ; -ln(1 - 0.75) = ln 4 ; mean = 1.5 ln 2
    assert math.isclose(
        float(classification_loss(logits, targets)), 1.5 * math.log(2), rel_tol=1e-6
    )
    # weight 0 removes the second scan (a pseudo-label below the confidence cut-off)
    w = torch.tensor([1.0, 0.0])
    assert math.isclose(float(classification_loss(logits, targets, w)), math.log(2), rel_tol=1e-6)
    # soft target 0.75 against p = 0.75: the entropy of 0.75
    soft = classification_loss(torch.tensor([math.log(3.0)]), torch.tensor([0.75]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(soft), entropy, rel_tol=1e-6)


def test_roi_loss_hand_worked() -> None:
    # p = 0.5 everywhere, half of the voxels are nodes:
    # CE = ln 2 ; Dice = 1 - 2·(0.5·N/2) / (0.5·N + N/2) = 0.5
    logits = torch.zeros(2, 1, 4, 4, 4)
    target = torch.zeros(2, 1, 4, 4, 4)
    target[:, :, :2] = 1
    assert math.isclose(float(RoiLoss()(logits, target)), math.log(2) + 0.5, rel_tol=1e-4)


def test_roi_loss_is_near_zero_for_a_confident_correct_map_and_handles_empty_masks() -> None:
    target = torch.zeros(2, 1, 4, 4, 4)
    target[0, 0, 1:3, 1:3, 1:3] = 1  # the second scan has no node at all
    logits = (target * 2 - 1) * 20
    assert float(RoiLoss()(logits, target)) < 1e-3
    # all-empty target and all-negative prediction: no 0/0
    empty = torch.zeros(2, 1, 4, 4, 4)
    assert math.isfinite(float(RoiLoss()(-20 * torch.ones_like(empty), empty)))
