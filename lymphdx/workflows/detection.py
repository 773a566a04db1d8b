"""Lesion-level detection evaluation of the ROI decoder: candidates, matching, FROC, Dice.

The paper evaluates the ROI map only as an auxiliary task; this module scores it as a node
detector, the way detection challenges do (LUNA16, CAMELYON16):

- **candidates**: connected components (26-connectivity) of ``prob > candidate_threshold``;
  a candidate's score is the component's maximum probability, its position the voxel
  nearest to the component's probability-weighted centre of mass.
- **matching**: a candidate hits a node when its centre voxel lies inside the node
  (instance id > 0 there). A node counts once: the highest-scoring candidate on it is the
  true positive and every other candidate on the same node is *ignored* (neither TP nor
  FP), as in LUNA16. Candidates whose centre lies on background are false positives.
- **FROC**: for every score threshold *t* (each distinct candidate score), FPs per volume
  = #FP with score ≥ t / #volumes and sensitivity = #TP with score ≥ t / #nodes. The
  sensitivity reported at an FP rate *r* is that of the lowest threshold whose FPs per
  volume ≤ *r* (a step function, no interpolation; ``(0, 0)`` is always on the curve), at
  the LUNA16 rates 1/8 … 8; ``mean_sensitivity`` is their mean (the CPM score).

Everything is computed on the canonical (preprocessed) grid. The preprocessing cache keeps
masks binary, so ground-truth instances are re-derived there as connected components of
the resampled mask: nodes that touch after resampling merge into one instance, and a node
split by resampling becomes two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.metrics import compute_froc_curve_data
from scipy import ndimage

from lymphdx.core.config import Config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_json
from lymphdx.core.zeta import roi_mask
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.inferer import Inferer, WholeInferer, make_inferer
from lymphdx.engine.run_data import RunData, load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.engine.run_state import refuse_while_busy
from lymphdx.models.domain_norm import domains
from lymphdx.stats.metrics import dice_counts, dice_of

__all__ = [
    "FP_RATES",
    "Candidate",
    "MatchResult",
    "candidates",
    "instances",
    "match",
    "froc",
    "evaluate_detection",
]

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1, 2, 4, 8)
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


@dataclass(frozen=True)
class Candidate:
    """One detection: ``score`` (max probability), ``centre`` voxel ``(z, y, x)``, size in
    voxels and, when a spacing was given, in mm³ (else None)."""

    score: float
    centre: tuple[int, int, int]
    voxels: int
    volume_mm3: float | None = None


def candidates(
    prob_zyx: np.ndarray,
    threshold: float,
    spacing_xyz: Sequence[float] | None = None,
) -> list[Candidate]:
    """Connected components of ``prob_zyx > threshold`` as candidates, highest score first.

    Args:
        prob_zyx: ``(z, y, x)`` probability map.
        threshold: candidate threshold (low, e.g. 0.1: FROC sweeps over the scores).
        spacing_xyz: voxel spacing in mm, ITK ``(x, y, z)``; only fills ``volume_mm3``.
    """
    prob = np.asarray(prob_zyx, dtype=np.float64)
    if prob.ndim != 3:
        raise ValueError(f"expected a (z, y, x) probability map, got shape {prob.shape}")
    labels, n = ndimage.label(prob > threshold, structure=_STRUCTURE)
    if n == 0:
        return []
    ids = np.arange(1, n + 1)
    scores = ndimage.maximum(prob, labels, ids)
    centres = ndimage.center_of_mass(prob, labels, ids)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    voxel_mm3 = float(np.prod(spacing_xyz)) if spacing_xyz is not None else None
    upper = np.array(prob.shape) - 1
    out = [
        Candidate(
            score=float(s),
            centre=tuple(int(v) for v in np.clip(np.rint(c), 0, upper)),  # type: ignore[arg-type]
            voxels=int(k),
            volume_mm3=None if voxel_mm3 is None else float(k) * voxel_mm3,
        )
        for s, c, k in zip(scores, centres, sizes, strict=True)
    ]
    out.sort(key=lambda c: -c.score)  # stable: ties keep label order
    return out


def instances(mask_zyx: np.ndarray) -> np.ndarray:
    """Node instance ids ``(z, y, x)`` int32 of a mask.

    A binary mask (values in {0, 1}) is split into connected components (26-connectivity),
    one id per node; a mask that already holds ids > 1 is returned as is (as int32).
    """
    mask = np.asarray(mask_zyx)
    if mask.dtype == bool or mask.max(initial=0) <= 1:
        labels, _ = ndimage.label(mask > 0, structure=_STRUCTURE)
        return labels.astype(np.int32)
    return mask.astype(np.int32)


class MatchResult(NamedTuple):
    """Per-candidate outcome: ``is_tp`` ``(n,)`` bool, ``hit_node_ids`` ``(n,)`` int (0 =
    background) and the number of ground-truth nodes."""

    is_tp: np.ndarray
    hit_node_ids: np.ndarray
    n_nodes: int

    @property
    def ignored(self) -> np.ndarray:
        """``(n,)`` bool: on a node already hit by a higher-scoring candidate."""
        return (self.hit_node_ids > 0) & ~self.is_tp

    @property
    def is_fp(self) -> np.ndarray:
        """``(n,)`` bool: centre on background."""
        return self.hit_node_ids == 0


def match(cands: Sequence[Candidate], truth_instances_zyx: np.ndarray) -> MatchResult:
    """Match candidates to ground-truth nodes by their centre voxel.

    Args:
        cands: candidates of one volume (any order).
        truth_instances_zyx: ``(z, y, x)`` instance ids (0 background); a binary mask is
            split into connected components first (see :func:`instances`).

    The highest-scoring candidate on a node is its TP (ties: the earlier in ``cands``); the
    others on that node are ignored (``MatchResult.ignored``).
    """
    inst = instances(truth_instances_zyx)
    n_nodes = int(np.count_nonzero(np.unique(inst)))
    n = len(cands)
    hit = np.zeros(n, dtype=np.int64)
    is_tp = np.zeros(n, dtype=bool)
    if n == 0:
        return MatchResult(is_tp, hit, n_nodes)
    centres = np.array([c.centre for c in cands], dtype=np.int64)
    if centres.shape[1] != inst.ndim or np.any(centres < 0) or np.any(centres >= inst.shape):
        raise ValueError(f"candidate centres fall outside the truth volume {inst.shape}")
    hit[:] = inst[tuple(centres.T)]
    seen: set[int] = set()
    for i in sorted(range(n), key=lambda i: -cands[i].score):  # stable sort
        node = int(hit[i])
        if node and node not in seen:
            seen.add(node)
            is_tp[i] = True
    return MatchResult(is_tp, hit, n_nodes)


def froc(
    per_volume: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    n_nodes_total: int,
    n_volumes: int,
    fp_rates: Sequence[float] = FP_RATES,
) -> dict[str, Any]:
    """FROC over volumes from per-volume ``(scores, is_tp, ignored)`` arrays ``(n_v,)``.

    Returns ``{"fp_rates", "sensitivity" (one per rate), "mean_sensitivity", "curve":
    {"fps_per_volume", "sensitivity"}}``; the curve runs from ``(0, 0)`` (highest
    threshold) to all candidates kept, FPs per volume non-decreasing. With no nodes the
    sensitivities are None (undefined).
    """
    if n_volumes <= 0:
        raise LymphdxError("FROC needs at least one volume")
    tp_scores, fp_scores = [], []
    for scores, is_tp, ignored in per_volume:
        s = np.asarray(scores, dtype=np.float64).ravel()
        tp = np.asarray(is_tp, dtype=bool).ravel()
        ig = np.asarray(ignored, dtype=bool).ravel()
        if not (len(s) == len(tp) == len(ig)):
            raise ValueError("scores, is_tp and ignored differ in length")
        if np.any(tp & ig):
            raise ValueError("a candidate is both a true positive and ignored")
        tp_scores.append(s[tp])
        fp_scores.append(s[~tp & ~ig])
    tp_probs = np.concatenate([np.zeros(0), *tp_scores])
    fp_probs = np.concatenate([np.zeros(0), *fp_scores])
    if n_nodes_total < len(tp_probs):
        raise ValueError(f"{len(tp_probs)} true positives but only {n_nodes_total} nodes")
    rates = [float(r) for r in fp_rates]
    # MONAI uses thresholds sorted(set(all scores))[1:] (it skips the lowest, meant to be the
    # 0 that stands for a missed node) with ``score >= t``, then appends (0, 0). A sentinel
    # score below every candidate's makes the lowest real score a threshold too.
    sentinel = min(0.0, float(np.min(np.concatenate([tp_probs, fp_probs]), initial=0.0))) - 1.0
    fps, sens = compute_froc_curve_data(
        np.append(fp_probs, sentinel), tp_probs, max(1, n_nodes_total), n_volumes
    )
    fps, sens = np.asarray(fps, dtype=np.float64)[::-1], np.asarray(sens, dtype=np.float64)[::-1]
    if n_nodes_total == 0:  # sensitivity is undefined; the FP axis is still informative
        return {
            "fp_rates": rates,
            "sensitivity": [None] * len(rates),
            "mean_sensitivity": None,
            "curve": {"fps_per_volume": fps.tolist(), "sensitivity": [None] * len(fps)},
        }
    sens_at = [float(sens[fps <= r + 1e-12].max()) for r in rates]  # (0, 0) is always there
    return {
        "fp_rates": rates,
        "sensitivity": sens_at,
        "mean_sensitivity": float(np.mean(sens_at)),
        "curve": {"fps_per_volume": fps.tolist(), "sensitivity": sens.tolist()},
    }


# --------------------------------------------------------------------------- run level


@torch.no_grad()
def _roi_probabilities(
    model: torch.nn.Module,
    volumes: VolumeSet,
    index: Sequence[int],
    domain: int,
    tta: bool = False,
    inferer: Inferer | None = None,
) -> list[np.ndarray]:
    """σ(g(f(v))) ``(D, H, W)`` float32 for volumes ``index`` of a VolumeSet, eval mode,
    from ``inferer`` (default ``WholeInferer``); ``domain`` routes a model with
    domain-specific batch norm (weak 0, strong 1); ``tta``: averaged with the left-right
    flip's map (flipped back)."""
    inferer = inferer or WholeInferer()
    model.eval()
    out = []
    n = inferer.batch_size(4)
    with domains(model, domain):
        for start in range(0, len(index), n):
            batch = volumes.batch(list(index[start : start + n]))
            out.extend(inferer(model, batch.images, flips=tta)["roi"][:, 0].cpu().numpy())
    return out


def _score_split(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    candidate_threshold: float,
    roi_threshold: float,
) -> dict[str, Any]:
    """Detection and overlap metrics of one split from ROI probabilities and binary truth."""
    per_volume, per_dice = [], []
    n_nodes = n_cands = 0
    inter = total = 0
    for prob, truth in zip(probs, truths, strict=True):
        if prob.shape != truth.shape:
            raise LymphdxError(f"ROI map {prob.shape} and mask {truth.shape} differ in shape")
        cands = candidates(prob, candidate_threshold)
        m = match(cands, instances(truth))
        per_volume.append((np.array([c.score for c in cands]), m.is_tp, m.ignored))
        n_nodes += m.n_nodes
        n_cands += len(cands)
        counts = dice_counts(roi_mask(prob, roi_threshold), truth)
        per_dice.append(dice_of(*counts))
        inter, total = inter + counts[0], total + counts[1]
    return {
        "n_volumes": len(probs),
        "n_nodes": n_nodes,
        "n_candidates": n_cands,
        "dice": dice_of(inter, total),
        "dice_mean_per_volume": float(np.mean(per_dice)) if per_dice else None,
        "froc": froc(per_volume, n_nodes, max(1, len(probs))),
    }


def weak_truth_masks(
    data: RunData, weak: VolumeSet, truth_dir: Path
) -> tuple[list[int], list[np.ndarray]]:
    """The synthetic generator's true masks ``(D, H, W)`` of the weak scans ``weak`` that
    have one in ``truth_dir`` (``<patient_id>.nii.gz``), on the working grid as the cache
    prepares masks: their positions in ``weak`` and the masks."""
    idx, truths = [], []
    for i, rec in enumerate(weak.records):
        path = truth_dir / f"{rec.patient_id}.nii.gz"
        if path.exists():
            idx.append(i)
            truths.append(data.cache.mask(path, rec.image, rec.patient_id))
    return idx, truths


def evaluate_detection(
    run_dir: str | Path,
    candidate_threshold: float = 0.1,
    loaded: tuple[Config, torch.nn.Module, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score the run's ``best`` model as a node detector; writes ``RUN/detection.json``.

    ``strong_test``: the strong set's test split against its masks. ``weak_test``: the weak
    set's test split against the synthetic generator's true masks
    (``<data>/weak_truth/masks/<patient_id>.nii.gz``, beside the weak manifest's folder),
    only for patients whose file exists; omitted when there are none. Dice uses the ROI map
    thresholded at ζ (``propagation.roi_threshold``); volumes without nodes count in the
    FPs per volume, and their per-volume Dice is 1 only when nothing is predicted.
    ``loaded``: the run's ``load_model`` when the caller has it (``evaluate``, which holds
    the run's lock); ``checkpoint`` records which weights were scored.
    """
    run_dir = Path(run_dir)
    if loaded is None:
        refuse_while_busy(run_dir, "score it")
    config, model, state = loaded if loaded is not None else load_model(run_dir)
    data = load_run_data(config, run_dir)
    zeta = float(config.propagation.roi_threshold)
    inferer = make_inferer(config)
    result: dict[str, Any] = {
        "candidate_threshold": float(candidate_threshold),
        "roi_threshold": zeta,
        "grid": "canonical (preprocessed)",
        "tta_flip": bool(config.evaluation.tta_flip),
        "inferer": inferer.name,
        "best_epoch": int(state["best"]["epoch"]),
        "checkpoint": state["source"],
    }

    strong = data.volumes("strong", "test", masks=True)
    if len(strong) == 0:
        raise LymphdxError("the strong set has no patients in split 'test'")
    idx = list(range(len(strong)))
    result["strong_test"] = _score_split(
        _roi_probabilities(model, strong, idx, STRONG, config.evaluation.tta_flip, inferer),
        [strong.mask(i) for i in idx],
        candidate_threshold,
        zeta,
    )

    truth_dir = Path(config.manifests.weak).parent.parent / "weak_truth" / "masks"
    if truth_dir.is_dir():
        weak = data.volumes("weak", "test")
        idx, truths = weak_truth_masks(data, weak, truth_dir)
        if idx:
            result["weak_test"] = _score_split(
                _roi_probabilities(model, weak, idx, WEAK, config.evaluation.tta_flip, inferer),
                truths,
                candidate_threshold,
                zeta,
            )
    write_json(run_dir / "detection.json", result)
    return result
