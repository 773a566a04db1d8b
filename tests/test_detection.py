"""Lesion-level detection evaluation: candidates, matching, FROC, Dice, and a run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from monai.metrics import compute_fp_tp_probs_nd

from lymphdx.stats.metrics import dice
from lymphdx.workflows.detection import (
    FP_RATES,
    Candidate,
    candidates,
    evaluate_detection,
    froc,
    instances,
    match,
)
from tests.conftest import tiny_config


def _cube(shape: tuple[int, int, int], centre: tuple[int, int, int], r: int) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(c - r, c + r + 1) for c in centre)] = True
    return out


# --------------------------------------------------------------------------- candidates


def test_candidates_scores_centres_and_26_connectivity() -> None:
    prob = np.full((12, 12, 12), 0.05)
    prob[_cube(prob.shape, (5, 5, 5), 1)] = 0.5
    prob[5, 5, 5] = 0.9
    prob[7, 7, 7] = 0.5  # touches the cube's corner (6, 6, 6) only diagonally
    prob[1, 9, 2] = 0.3  # a separate one-voxel component
    prob[10, 1, 10] = 0.1  # not above the threshold
    cands = candidates(prob, 0.1, spacing_xyz=(2.0, 1.0, 3.0))
    assert [c.score for c in cands] == pytest.approx([0.9, 0.3])  # highest first
    assert cands[0].centre == (5, 5, 5) and cands[0].voxels == 28
    assert cands[1].centre == (1, 9, 2) and cands[1].voxels == 1
    assert cands[1].volume_mm3 == pytest.approx(6.0)
    assert candidates(prob, 0.1)[0].volume_mm3 is None
    assert candidates(np.zeros((4, 4, 4)), 0.1) == []


def test_candidate_centre_is_probability_weighted() -> None:
    prob = np.zeros((3, 3, 9))
    prob[1, 1, 1:8] = [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.95]  # peak at the right end
    (cand,) = candidates(prob, 0.1)
    # weighted x = (0.2 * (1+2+3+4+5+6) + 0.95 * 7) / (1.2 + 0.95) = 5.0
    assert cand.centre == (1, 1, 5) and cand.score == pytest.approx(0.95)


# --------------------------------------------------------------------------- match


def test_match_hits_misses_and_duplicates() -> None:
    truth = np.zeros((10, 10, 10), dtype=np.uint16)
    truth[_cube(truth.shape, (3, 3, 3), 1)] = 4
    truth[_cube(truth.shape, (7, 7, 7), 1)] = 9
    cands = [
        Candidate(0.5, (3, 3, 4), 3),  # node 4, but a higher-scoring one is there too
        Candidate(0.9, (3, 2, 3), 5),  # node 4: the TP
        Candidate(0.7, (0, 9, 0), 2),  # background: FP
        Candidate(0.2, (7, 7, 7), 8),  # node 9: TP even with a low score
    ]
    m = match(cands, truth)
    assert m.n_nodes == 2
    assert m.is_tp.tolist() == [False, True, False, True]
    assert m.hit_node_ids.tolist() == [4, 4, 0, 9]
    assert m.ignored.tolist() == [True, False, False, False]
    assert m.is_fp.tolist() == [False, False, True, False]
    is_tp, hit, n = m  # unpacks as (is_tp, hit_node_ids, n_nodes)
    assert n == 2 and hit[2] == 0


def test_match_splits_binary_mask_into_nodes() -> None:
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[_cube(mask.shape, (2, 2, 2), 1)] = 1
    mask[_cube(mask.shape, (7, 7, 7), 1)] = 1
    mask[4, 4, 4] = 1  # touches (3, 3, 3) diagonally: part of the first node
    mask[5, 0, 9] = 1  # an isolated voxel: a third node
    inst = instances(mask)
    assert inst.max() == 3
    assert inst[4, 4, 4] == inst[2, 2, 2] != inst[7, 7, 7]
    m = match([Candidate(0.6, (2, 2, 2), 1), Candidate(0.5, (7, 6, 8), 1)], mask)
    assert m.n_nodes == 3 and m.is_tp.all() and m.hit_node_ids[0] != m.hit_node_ids[1]
    assert match([], mask).n_nodes == 3


def test_match_agrees_with_monai_fp_tp_probs() -> None:
    rng = np.random.default_rng(5)
    truth = np.zeros((8, 12, 12), dtype=np.int64)
    for k, c in enumerate([(2, 3, 3), (5, 8, 8), (2, 9, 2)], start=1):
        truth[_cube(truth.shape, c, 1)] = k
    cands = [
        Candidate(float(rng.uniform(0.1, 1)), tuple(int(v) for v in rng.integers(0, s)), 1)
        for s in [truth.shape] * 40
    ]
    cands += [Candidate(0.33, (2, 3, 3), 1), Candidate(0.44, (2, 3, 2), 1)]
    m = match(cands, truth)
    scores = np.array([c.score for c in cands])
    fp, tp, n = compute_fp_tp_probs_nd(scores, np.array([c.centre for c in cands]), truth)
    assert n == m.n_nodes == 3
    assert sorted(fp) == pytest.approx(sorted(scores[m.is_fp]))
    assert sorted(tp[tp > 0]) == pytest.approx(sorted(scores[m.is_tp]))


# --------------------------------------------------------------------------- FROC


def _brute_force_froc(per_volume, n_nodes: int, n_volumes: int, rates) -> list[float]:
    """Sensitivity at the most permissive threshold whose FPs per volume ≤ rate."""
    items = [
        (float(s), bool(t))
        for scores, tp, ig in per_volume
        for s, t, i in zip(scores, tp, ig, strict=True)
        if not i
    ]
    out = []
    for rate in rates:
        best = 0.0
        for thr in [math.inf] + [s for s, _ in items]:
            fps = sum(1 for s, t in items if s >= thr and not t) / n_volumes
            if fps <= rate:
                best = max(best, sum(1 for s, t in items if s >= thr and t) / n_nodes)
        out.append(best)
    return out


def _vol(scores, tp, ig=None):
    ig = [False] * len(scores) if ig is None else ig
    return np.array(scores, float), np.array(tp, bool), np.array(ig, bool)


def test_froc_hand_worked_example() -> None:
    # volume A: nodes 1, 2; volume B: node 3. Kept candidates by score:
    # 0.9 T, 0.8 F, 0.6 F, 0.5 T, 0.3 F, 0.25 T, 0.2 F, 0.15 F  (0.7 is a duplicate: ignored)
    # threshold -> (FPs/volume, sensitivity): 0.9 (0, 1/3), 0.8 (.5, 1/3), 0.6 (1, 1/3),
    # 0.5 (1, 2/3), 0.3 (1.5, 2/3), 0.25 (1.5, 1), 0.2 (2, 1), 0.15 (2.5, 1)
    a = _vol([0.9, 0.8, 0.7, 0.25, 0.3], [1, 0, 0, 1, 0], [0, 0, 1, 0, 0])
    b = _vol([0.6, 0.5, 0.2, 0.15], [0, 1, 0, 0])
    out = froc([a, b], n_nodes_total=3, n_volumes=2)
    assert out["fp_rates"] == list(FP_RATES)
    expected = [1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1]
    assert out["sensitivity"] == pytest.approx(expected)
    assert out["mean_sensitivity"] == pytest.approx(2 / 3)
    curve = out["curve"]
    assert curve["fps_per_volume"] == pytest.approx([0, 0, 0.5, 1, 1, 1.5, 1.5, 2, 2.5])
    assert curve["sensitivity"] == pytest.approx(np.array([0, 1, 1, 1, 2, 2, 3, 3, 3]) / 3)
    assert out["sensitivity"] == pytest.approx(_brute_force_froc([a, b], 3, 2, FP_RATES))


def test_froc_matches_brute_force_on_random_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n_volumes = int(rng.integers(1, 5))
        per_volume, n_nodes = [], 0
        for _ in range(n_volumes):
            k = int(rng.integers(0, 4))  # nodes in this volume
            n_nodes += k
            n = int(rng.integers(0, 12))
            scores = np.round(rng.uniform(0.1, 1, n), 1)  # ties on purpose
            tp = np.zeros(n, bool)
            tp[rng.permutation(n)[: min(k, int(rng.integers(0, n + 1)))]] = True
            ig = ~tp & (rng.uniform(size=n) < 0.2)
            per_volume.append((scores, tp, ig))
        n_nodes = max(n_nodes, sum(int(v[1].sum()) for v in per_volume), 1)
        rates = (0.125, 0.25, 0.5, 1, 2, 4, 8, 0.3, 100)
        out = froc(per_volume, n_nodes, n_volumes, rates)
        assert out["sensitivity"] == pytest.approx(
            _brute_force_froc(per_volume, n_nodes, n_volumes, rates)
        )
        fps = np.array(out["curve"]["fps_per_volume"])
        sens = np.array(out["curve"]["sensitivity"])
        assert fps[0] == 0 and sens[0] == 0
        assert np.all(np.diff(fps) >= 0) and np.all(np.diff(sens) >= 0)


def test_froc_edge_cases() -> None:
    none = froc([_vol([], [])], n_nodes_total=2, n_volumes=1)
    assert none["sensitivity"] == [0.0] * 7 and none["mean_sensitivity"] == 0.0
    no_nodes = froc([_vol([0.5], [0])], n_nodes_total=0, n_volumes=1)
    assert no_nodes["mean_sensitivity"] is None
    assert no_nodes["curve"]["fps_per_volume"] == [0.0, 1.0]
    with pytest.raises(ValueError):
        froc([_vol([0.5, 0.4], [1, 1])], n_nodes_total=1, n_volumes=1)
    with pytest.raises(ValueError):
        froc([_vol([0.5], [1], [1])], n_nodes_total=1, n_volumes=1)


def test_perfect_map_gives_full_sensitivity_and_dice_one() -> None:
    truth = np.zeros((2, 10, 10, 10), dtype=np.uint8)
    truth[0][_cube((10, 10, 10), (3, 3, 3), 1)] = 1
    truth[0][_cube((10, 10, 10), (7, 7, 7), 1)] = 1
    truth[1][_cube((10, 10, 10), (5, 5, 5), 2)] = 1
    per_volume, n_nodes = [], 0
    for t in truth:
        prob = t.astype(np.float32)
        cands = candidates(prob, 0.1)
        m = match(cands, t)
        per_volume.append((np.array([c.score for c in cands]), m.is_tp, m.ignored))
        n_nodes += m.n_nodes
        assert dice(prob > 0.8, t) == 1.0
    out = froc(per_volume, n_nodes, len(truth))
    assert n_nodes == 3
    assert out["sensitivity"] == [1.0] * len(FP_RATES) and out["mean_sensitivity"] == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(np.array([1, 0]), np.array([0, 1])) == 0.0


# --------------------------------------------------------------------------- a run


def test_evaluate_detection_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    from lymphdx.engine.train import train

    config = tiny_config(tmp_path, training={"epochs": 1})
    run_dir = tmp_path / "run"
    train(
        config,
        run_dir,
        tiny_data / "weak" / "manifest.csv",
        tiny_data / "strong" / "manifest.csv",
        progress=False,
    )
    result = evaluate_detection(run_dir)
    on_disk = json.loads((run_dir / "detection.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["candidate_threshold"] == 0.1
    assert on_disk["roi_threshold"] == pytest.approx(config.propagation.roi_threshold)
    for key in ("strong_test", "weak_test"):
        part = on_disk[key]
        assert part["n_volumes"] >= 1 and part["n_nodes"] >= 0
        assert 0.0 <= part["dice"] <= 1.0 and 0.0 <= part["dice_mean_per_volume"] <= 1.0
        f = part["froc"]
        assert f["fp_rates"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
        if part["n_nodes"]:
            assert all(0.0 <= s <= 1.0 for s in f["sensitivity"])
            assert 0.0 <= f["mean_sensitivity"] <= 1.0
        assert len(f["curve"]["fps_per_volume"]) == len(f["curve"]["sensitivity"])
    assert on_disk["strong_test"]["n_nodes"] >= 1
