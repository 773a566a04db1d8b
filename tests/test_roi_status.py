"""Whether a run's ROI decoder learned, read from hand-written history rows."""

from __future__ import annotations

import numpy as np
import pytest

from lymphdx.engine.roi_status import (
    MIN_NODE_VOXELS,
    ROI_LEARNED_DICE,
    STATUS_FILE,
    decoder_status,
    node_size_status,
    read_roi_status,
    roi_decoder_status,
    write_roi_status,
)
from lymphdx.reporting.table import format_table


def _rows(*dice: float | None) -> list[dict[str, str]]:
    return [
        {"epoch": str(i), "strong_val_dice": "" if d is None else str(d)}
        for i, d in enumerate(dice)
    ]


def test_no_roi_task_gives_no_status() -> None:
    assert roi_decoder_status(_rows(None, None)) is None
    assert roi_decoder_status([]) is None


def test_a_decoder_that_found_nodes_learned() -> None:
    status = roi_decoder_status(_rows(0.0, 0.31, 0.58, 0.55))
    assert status == {
        "learned": True,
        "final_strong_val_dice": 0.55,
        "best_strong_val_dice": 0.58,
        "dice": 0.55,
        "read_on": "strong validation scans (history.csv; a run from before roi_status.json)",
        "note": None,
    }


def test_a_decoder_at_zero_never_learned() -> None:
    status = roi_decoder_status(_rows(0.0, 0.0, 0.01))
    assert status is not None and status["learned"] is False
    assert status["final_strong_val_dice"] == 0.01
    assert "never learned" in status["note"] and "0.010" in status["note"]


def test_a_decoder_that_collapsed_lost_what_it_learned() -> None:
    status = roi_decoder_status(_rows(0.2, 0.5, 0.0))
    assert status is not None and not status["learned"]
    assert "lost what it had learned" in status["note"] and "best 0.500" in status["note"]


@pytest.mark.parametrize("final, learned", [(ROI_LEARNED_DICE, True), (0.049, False)])
def test_threshold_is_inclusive(final: float, learned: bool) -> None:
    status = roi_decoder_status(_rows(0.3, final))
    assert status is not None and status["learned"] is learned


def test_results_table_flags_strategies_whose_decoder_never_learned() -> None:
    row = {
        "test_auc": [0.7, 0.6],
        "test_auc_mean": 0.65,
        "test_auc_sd": 0.07,
        "test_auc_ci95": [0.5, 0.8],
        "paper_auc": None,
    }
    results = {
        "seeds": [0, 1],
        "n_test": 40,
        "n_test_pos": 20,
        "paired_tests": {},
        "strategies": {
            "supervised": dict(row),
            "multitask": {**row, "roi_not_learned": ["r/seed1"]},
        },
    }
    table = format_table(results)
    flagged = [line for line in table.splitlines() if "found no node" in line]
    assert len(flagged) == 1
    assert "Multi-Task" in flagged[0] and "in 1 of 2 run(s)" in flagged[0]


def test_node_sizes_by_hand() -> None:
    """A 3×3×3 block (27 voxels) and a 2-voxel node joined only at a corner (one node under
    26-connectivity), in two masks: equal-volume sphere diameters (6·27/π)^(1/3) = 3.721
    and (6·2/π)^(1/3) = 1.563 voxels, median 2.642; on a 2×2×4 mm grid a voxel's cube is
    16^(1/3) = 2.520 mm."""
    a = np.zeros((8, 8, 8), np.uint8)
    a[1:4, 1:4, 1:4] = 1
    b = np.zeros((6, 6, 6), np.uint8)
    b[2, 2, 2] = b[3, 3, 3] = 7  # instance labels count as foreground
    status = node_size_status([a, b], (2.0, 2.0, 4.0))
    assert status is not None
    assert status["n_nodes"] == 2
    assert status["median_diameter_voxels"] == pytest.approx((3.7208 + 1.5632) / 2, abs=1e-3)
    assert status["median_diameter_mm"] == pytest.approx(2.642 * 16 ** (1 / 3), abs=1e-2)
    assert status["note"] is None  # 2.64 >= MIN_NODE_VOXELS
    assert node_size_status([np.zeros((4, 4, 4))], (1.0, 1.0, 1.0)) is None


def test_small_nodes_get_a_note_that_says_what_to_change() -> None:
    one_voxel = np.zeros((5, 5, 5), np.uint8)
    one_voxel[2, 2, 2] = 1  # diameter (6/π)^(1/3) = 1.24 voxels
    status = node_size_status([one_voxel], (5.0, 5.0, 6.0))
    assert status is not None and status["median_diameter_voxels"] < MIN_NODE_VOXELS
    assert "1.2 voxels" in status["note"] and "data.spacing" in status["note"]
    assert "--preset clinical" in status["note"]  # the advice names what can be done
    resized = node_size_status([one_voxel], None)  # data.fit: resize, no one spacing
    assert resized is not None and resized["median_diameter_mm"] is None
    assert "mm at data.spacing" not in resized["note"]


def test_the_status_training_writes_is_read_before_the_history(tmp_path) -> None:
    """A run's ``roi_status.json`` (Dice on all strong training + validation scans) rules;
    a run from before it is read from its history's validation Dice."""
    (tmp_path / "history.csv").write_text("epoch,strong_val_dice\r\n0,0.01\r\n")
    old = read_roi_status(tmp_path)
    assert old is not None and old["learned"] is False and "history.csv" in old["read_on"]
    written = write_roi_status(tmp_path, 0.21, 69)
    assert (tmp_path / STATUS_FILE).exists()
    assert read_roi_status(tmp_path) == written == decoder_status(0.21, 69)
    assert written["learned"] and written["n_scans"] == 69 and written["note"] is None
    lost = decoder_status(0.02, 69)
    assert not lost["learned"] and "on all 69 strong training + validation scans" in lost["note"]
