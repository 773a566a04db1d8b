"""Loss values against hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
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


def test_roi_loss_is_monai_dice_ce_bit_for_bit() -> None:
    """One process is the trivial case of the global-batch sums: value and gradient are
    those of MONAI's ``DiceCELoss(sigmoid=True, batch=True)`` to the last bit, so training
    in one process did not change when the losses were written once for DDP."""
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    for shape, lambdas in [((2, 1, 6, 10, 10), (1.0, 1.0)), ((3, 1, 5, 7, 9), (0.5, 2.0))]:
        logits = torch.randn(shape, generator=g) * 3
        target = (torch.rand(shape, generator=g) > 0.9).float()
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ld, lc = lambdas
        expected = DiceCELoss(sigmoid=True, batch=True, lambda_dice=ld, lambda_ce=lc)(a, target)
        got = RoiLoss(lambda_dice=ld, lambda_ce=lc)(b, target, total_items=shape[0])
        expected.backward()
        got.backward()
        assert torch.equal(got, expected)
        assert a.grad is not None and b.grad is not None and torch.equal(b.grad, a.grad)


def test_classification_loss_item_scaled_weights_average_over_the_batch() -> None:
    # Iscen et al.: Σ w·ℓ / n, not Σ w·ℓ / Σ w; ℓ = ln 2 for logit 0 whatever the target
    logits, targets = torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([1.0, 0.5, 0.0, 0.5])
    got = classification_loss(logits, targets, w, total=4, scale_items=True)
    assert math.isclose(float(got), 2.0 * math.log(2) / 4, rel_tol=1e-6)
    # weights that select scans: the mean over the selected ones
    assert math.isclose(float(classification_loss(logits, targets, w)), math.log(2), rel_tol=1e-6)


def test_roi_mask_is_strictly_above_zeta_for_numpy_and_torch() -> None:
    from lymphdx.core.zeta import roi_mask

    prob = [0.0, 0.49, 0.5, 0.51, 1.0]
    assert roi_mask(np.array(prob), 0.5).tolist() == [False, False, False, True, True]
    assert roi_mask(torch.tensor(prob), 0.5).tolist() == [False, False, False, True, True]
