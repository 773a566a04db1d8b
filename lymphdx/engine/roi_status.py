"""Did a run's ROI decoder learn? And can it: are the strong set's nodes large enough on the
training grid?

Training ends by scoring best.pt's decoder on all strong training + validation scans
(``strong_dice``, ``write_roi_status``: ``RUN/roi_status.json``), not on the validation
split's few patients, whose pooled Dice swings with which nodes they happen to hold
(BENCHMARKS.md); older runs are read from ``history.csv`` (``roi_decoder_status``).
A run whose decoder ends with no Dice found no node: its scan-level AUC
then measures a classifier without the ROI task, not the strategy, and ``train.log``,
``metrics.json`` and ``compare``'s ``results.md`` say so. Before training, nodes whose
median spans fewer than ``MIN_NODE_VOXELS`` voxels of the grid get a warning in
``train.log`` (``node_size_status``): that is where the quick preset failed (BENCHMARKS.md
section 1.4), and where ``training.small_node_epochs`` raises the budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import ndimage

from lymphdx.core.domains import STRONG
from lymphdx.core.files import read_csv, write_json
from lymphdx.core.zeta import roi_mask
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.inferer import Inferer, WholeInferer
from lymphdx.models.domain_norm import domains
from lymphdx.stats.metrics import dice_counts, dice_of

# below this strong-validation Dice at the end, the decoder is taken to find no node
# (one small node found among dozens of scans gives ~0.05)
ROI_LEARNED_DICE = 0.05
# below this median equivalent diameter (voxels of the training grid) the strong set's
# nodes are called small for the grid: the default phantom's is ~3 on the quick grid,
# the --node-scale 0.7 phantom's ~2, where the decoder learned too late (BENCHMARKS.md 1.4)
MIN_NODE_VOXELS = 2.5


#: what training writes at its end: did best.pt's decoder find nodes (``write_roi_status``)
STATUS_FILE = "roi_status.json"
_ON = "strong training + validation scans"


@torch.no_grad()
def strong_dice(
    model: torch.nn.Module,
    sets: Sequence[VolumeSet],
    threshold: float,
    ctx: DistContext,
    inferer: Inferer | None = None,
) -> float:
    """``model``'s Dice at ``threshold`` on the scans of ``sets`` (with masks), pooled over
    all of them; their ROI maps are ``inferer``'s (default ``WholeInferer``) without the
    flip, in eval mode (restored after); each rank scores its block of each set."""
    inferer = inferer or WholeInferer()
    was_training = model.training
    model.eval()
    inter = total = 0.0
    n = inferer.batch_size(4)
    try:
        with domains(model, STRONG):
            for volumes in sets:
                index = ctx.shard(range(len(volumes)))
                for start in range(0, len(index), n):
                    batch = volumes.batch(index[start : start + n])
                    assert batch.masks is not None, "strong_dice needs the sets' masks"
                    pred = roi_mask(inferer(model, batch.images)["roi"].cpu(), threshold)
                    counts = dice_counts(pred.numpy(), batch.masks.numpy())
                    inter, total = inter + counts[0], total + counts[1]
    finally:
        model.train(was_training)
    inter, total = ctx.all_gather_array(np.array([[inter, total]], dtype=float)).sum(axis=0)
    return dice_of(inter, total)


def decoder_status(dice: float, n_scans: int) -> dict[str, Any]:
    """``{"learned", "dice", "n_scans", "read_on", "note"}`` of a decoder whose Dice at ζ
    pooled over ``n_scans`` strong training + validation scans is ``dice``."""
    learned = dice >= ROI_LEARNED_DICE
    note = None
    if not learned:
        note = (
            f"the ROI decoder found no node: Dice {dice:.3f} at the end on all {n_scans} "
            f"{_ON} (< {ROI_LEARNED_DICE}), so this run's AUC is not the strategy's"
        )
    return {"learned": learned, "dice": dice, "n_scans": n_scans, "read_on": _ON, "note": note}


def write_roi_status(
    run_dir: Path, dice: float, n_scans: int, write: bool = True
) -> dict[str, Any]:
    """``decoder_status`` of the run's best.pt, written to ``RUN/roi_status.json`` (by
    one process: ``write``)."""
    status = decoder_status(dice, n_scans)
    if write:
        write_json(Path(run_dir) / STATUS_FILE, status)
    return status


def status_file(bn_stats: str = "trained") -> str:
    """Where the decoder's status with batch-norm statistics ``bn_stats`` is kept:
    training's (``trained``) in ``roi_status.json``; that of statistics re-estimated after
    training (``evaluation.bn_stats``, written by ``evaluate``) in ``roi_status_<how>.json``."""
    return STATUS_FILE if bn_stats == "trained" else f"roi_status_{bn_stats}.json"


def _scored_bn_stats(run_dir: Path) -> str:
    """The run's ``evaluation.bn_stats`` (``trained`` when its config says nothing)."""
    path = run_dir / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else None
    evaluation = (config or {}).get("evaluation") or {}
    return str(evaluation.get("bn_stats") or "trained")


def read_roi_status(run_dir: str | Path) -> dict[str, Any] | None:
    """Did the run's decoder find nodes, scored with the batch-norm statistics the run is
    scored with: ``roi_status.json`` (Dice on all strong training + validation scans,
    written at the end of training), ``roi_status_<how>.json`` under ``evaluation.bn_stats:
    <how>`` once ``evaluate`` wrote it, or, for runs from before either, the history's
    last strong-validation Dice (``roi_decoder_status``); None without an ROI task."""
    run_dir = Path(run_dir)
    for name in dict.fromkeys((status_file(_scored_bn_stats(run_dir)), STATUS_FILE)):
        if (run_dir / name).exists():
            return json.loads((run_dir / name).read_text())
    history = run_dir / "history.csv"
    return roi_decoder_status(read_csv(history)) if history.exists() else None


def roi_decoder_status(history: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``{"learned", "final_strong_val_dice", "best_strong_val_dice", "note"}`` from the
    history rows' ``strong_val_dice`` (``note`` is ``None`` when it learned); ``None``
    when no row has one (no ROI task, or no strong validation patient)."""
    dices = []
    for row in history:
        value = row.get("strong_val_dice")
        if value not in (None, ""):
            dices.append(float(value))
    if not dices:
        return None
    final, best = dices[-1], max(dices)
    learned = final >= ROI_LEARNED_DICE
    note = None
    if not learned:
        what = "never learned" if best < ROI_LEARNED_DICE else "lost what it had learned"
        note = (
            f"the ROI decoder {what}: strong-validation Dice {final:.3f} at the end (best "
            f"{best:.3f}; < {ROI_LEARNED_DICE} means it finds no node), so this run's AUC "
            "is not the strategy's"
        )
    return {
        "learned": learned,
        "final_strong_val_dice": final,
        "best_strong_val_dice": best,
        "dice": final,
        "read_on": "strong validation scans (history.csv; a run from before roi_status.json)",
        "note": note,
    }


def node_size_status(
    masks: Iterable[np.ndarray], spacing_mm: Sequence[float] | None
) -> dict[str, Any] | None:
    """``{"n_nodes", "median_diameter_voxels", "median_diameter_mm", "note"}`` of the
    nodes (connected components of ``mask > 0``, 26-connected) in ``masks``, each
    ``(D, H, W)`` on the training grid of ``spacing_mm`` ``(x, y, z)``. A node's diameter
    is the equal-volume sphere's; in voxels, that of a voxel's equal-volume cube
    (``prod(spacing) ** (1/3)``; ``None`` for a grid without one spacing, ``data.fit:
    resize``, and no millimetres). ``note`` (``None`` unless the median is below
    ``MIN_NODE_VOXELS``) says what to change. ``None`` without any node."""
    sizes: list[int] = []
    for mask in masks:
        labels, n = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes.extend(np.bincount(labels.ravel())[1:].tolist())
    if not sizes:
        return None
    diameter = float(np.median((6.0 * np.asarray(sizes, float) / np.pi) ** (1.0 / 3.0)))
    mm = None if spacing_mm is None else diameter * float(np.prod(spacing_mm)) ** (1.0 / 3.0)
    note = None
    if diameter < MIN_NODE_VOXELS:
        where = "" if mm is None else f" ({mm:.1f} mm at data.spacing {list(spacing_mm or [])})"
        note = (
            f"the strong set's nodes are small for this grid: their median equivalent "
            f"diameter is {diameter:.1f} voxels{where}, under {MIN_NODE_VOXELS}; the ROI "
            "decoder and the classifier may learn late or not at all. Train at a finer "
            "working spacing with the clinical preset (--preset clinical: 1.5 x 1.5 x "
            "2.5 mm, the whole field of view, tiles and sliding-window inference, so a "
            "step costs the same whatever the scan's size); a longer budget "
            "(training.small_node_epochs, else training.epochs) helps less"
        )
    return {
        "n_nodes": len(sizes),
        "median_diameter_voxels": diameter,
        "median_diameter_mm": mm,
        "note": note,
    }
