"""RUN/pseudo/: pseudo ROI masks of scans of their own sizes on disk, named by the
checkpoint, read memory-mapped (``engine.pseudo_store``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lymphdx.core.errors import LymphdxError
from lymphdx.engine.propagation import PseudoLabels
from lymphdx.engine.pseudo_store import prune, read_round, write_round
from lymphdx.engine.run_folder import pseudo_from_state, pseudo_to_state


def _masks(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = [(4, 6, 5), (3, 7, 7), (5, 5, 2)]
    masks = [(rng.random(s) > 0.7).astype(np.uint8) for s in shapes]
    weights = [(rng.random(s) > 0.2).astype(np.uint8) for s in shapes]
    return masks, weights


def test_a_round_reads_back_memory_mapped_as_written(tmp_path: Path) -> None:
    masks, weights = _masks(0)
    name = write_round(tmp_path, 6, masks, weights)
    assert name == "epoch_006"
    assert not list((tmp_path / "pseudo").glob(".tmp-*"))  # renamed when complete
    back, back_w = read_round(tmp_path, name)
    assert back_w is not None and len(back) == len(back_w) == 3
    for a, b, wa, wb in zip(masks, back, weights, back_w, strict=True):
        assert isinstance(b, np.memmap) and b.dtype == np.uint8 and b.shape == a.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(wa, wb)
    # unweighted rounds have no weight files
    assert read_round(tmp_path, write_round(tmp_path, 8, masks, None))[1] is None


def test_the_same_epoch_written_again_replaces_its_round(tmp_path: Path) -> None:
    write_round(tmp_path, 3, _masks(0)[0], None)
    newer = _masks(1)[0]
    write_round(tmp_path, 3, newer, None)
    for a, b in zip(newer, read_round(tmp_path, "epoch_003")[0], strict=True):
        np.testing.assert_array_equal(a, b)


def test_prune_keeps_the_named_rounds_and_removes_the_rest(tmp_path: Path) -> None:
    masks = _masks(0)[0]
    for epoch in (2, 4, 6):
        write_round(tmp_path, epoch, masks, None)
    (tmp_path / "pseudo" / ".tmp-epoch_008-123").mkdir()  # a round cut off mid-write
    prune(tmp_path, {"epoch_006"})
    assert [p.name for p in (tmp_path / "pseudo").iterdir()] == ["epoch_006"]
    prune(tmp_path / "elsewhere", set())  # no pseudo/ folder: nothing to do


def test_a_missing_round_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LymphdxError, match=r"epoch_004.*copy RUN/pseudo/"):
        read_round(tmp_path, "epoch_004")


def test_the_checkpoint_names_the_round_instead_of_holding_the_masks(tmp_path: Path) -> None:
    masks, weights = _masks(2)
    name = write_round(tmp_path, 5, masks, weights)
    stored = PseudoLabels(
        np.array([1.0, 0.0], np.float32), np.ones(2, np.float32), masks, 5, weights, name
    )
    state = pseudo_to_state(stored)
    assert state["weak_masks"] is None and state["weak_mask_weights"] is None
    assert state["weak_store"] == "epoch_005"
    back = pseudo_from_state(state, tmp_path)
    assert back.weak_store == name and back.epoch == 5
    assert back.weak_masks is not None and back.weak_mask_weights is not None
    for a, b in zip(masks, back.weak_masks, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.strong_targets, [1.0, 0.0])
    # a checkpoint of the fixed grid (stacked masks) still holds them itself
    fixed = PseudoLabels(None, None, np.stack([masks[0], masks[0]]), 2)
    state = pseudo_to_state(fixed)
    assert state["weak_store"] is None and tuple(state["weak_masks"].shape) == (2, 4, 6, 5)
    np.testing.assert_array_equal(pseudo_from_state(state, tmp_path).weak_masks[1], masks[0])


def test_checkpoints_from_before_the_store_still_resume(tmp_path: Path) -> None:
    """Lists of tensors in the checkpoint (the format before RUN/pseudo/)."""
    import torch

    masks = _masks(3)[0]
    old = {
        "epoch": 4,
        "strong_targets": None,
        "strong_weights": None,
        "weak_masks": [torch.from_numpy(m) for m in masks],
        "weak_mask_weights": None,
    }
    back = pseudo_from_state(old, tmp_path)
    assert back.weak_store is None and back.weak_masks is not None
    np.testing.assert_array_equal(back.weak_masks[2], masks[2])
