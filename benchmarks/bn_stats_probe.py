"""Does a run's eval-mode decoder Dice hinge on its batch-norm running statistics? (issue 29)

A clinical run trains with two separate forward passes per step in train mode: the weak
scans' bags (small tiles anywhere in the weak hospital's scans, with the bags'
augmentation) and the strong ROI patches (node-oversampled). Each pass moves every batch
norm's running mean and variance, so the statistics eval mode uses are a mix of both
kinds of input, while the decoder's loss was only ever computed under the patches' own
batch statistics. This probe scores one finished run's selected weights (``best.pt``:
the EMA under ``selection: ema_last``) as ``roi_status.json`` does (sliding window, no
flip, pooled Dice at ζ over the strong training + validation scans), with the batch-norm
statistics

- ``running``: as trained (what every score reads);
- ``patches``: re-estimated (``teacher.update_bn``, equal weights) on strong training ROI
  patches drawn as training draws them (``training.roi_foreground``, no augmentation);
- ``weak_tiles``: re-estimated on tiles of ``inference.bag_tile`` placed uniformly in the
  weak training scans (no augmentation);
- ``both``: on both, one batch of each in turn (what the running statistics average);

each also at ζ 0.2 and 0.5 (are the nodes found, under ζ?) with the mean probability on
the node voxels; then how far each model's statistics lie from the patches' (means in
the patches' standard deviations, log variance ratios), for the encoder and the decoder
apart.

Usage: python benchmarks/bn_stats_probe.py RUN_DIR [--batches 40]
[--model best|student|ema] [--variants running patches ...] [--json OUT.json]
(``student``/``ema``: ``last.pt``'s weights, readable while the run trains; set
LYMPHDX_CACHE to the run's cache; one thread is enough).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lymphdx.core.zeta import roi_mask  # noqa: E402
from lymphdx.data.sampling import patch_corner  # noqa: E402
from lymphdx.data.tile_sampler import crop_padded  # noqa: E402
from lymphdx.engine.inferer import make_inferer  # noqa: E402
from lymphdx.engine.run_data import load_run_data  # noqa: E402
from lymphdx.engine.run_folder import load_model, load_run_config, read_checkpoint  # noqa: E402
from lymphdx.engine.teacher import update_bn  # noqa: E402
from lymphdx.models.multitask import MultiTaskNet, build_model  # noqa: E402
from lymphdx.stats.metrics import dice_counts, dice_of  # noqa: E402

VARIANTS = ("running", "patches", "weak_tiles", "both")
#: thresholds the maps are also scored at (the run's ζ is added)
ZETAS = (0.2, 0.5)


@torch.no_grad()
def _dice_by_zeta(
    model: MultiTaskNet, sets: list[Any], zetas: list[float], inferer: Any
) -> tuple[dict[str, float], float]:
    """Pooled Dice over the scans of ``sets`` at each ζ of ``zetas`` (the maps computed
    once, as ``roi_status.strong_dice`` computes them: the inferer, no flip, batches of
    its size), and the mean probability on the node voxels."""
    counts = {z: np.zeros(2) for z in zetas}
    node_sum = node_n = 0.0
    n = inferer.batch_size(4)
    for volumes in sets:
        for start in range(0, len(volumes), n):
            batch = volumes.batch(list(range(start, min(start + n, len(volumes)))))
            prob = inferer(model, batch.images)["roi"].cpu().numpy()
            masks = batch.masks.numpy()
            for z in zetas:
                counts[z] += dice_counts(roi_mask(prob, z), masks)
            node_sum += float(prob[masks > 0].sum())
            node_n += float((masks > 0).sum())
    return {f"{z:g}": dice_of(*c) for z, c in counts.items()}, node_sum / max(node_n, 1.0)


def _patch_batches(
    volumes: Any, patch: tuple[int, int, int], foreground: float, batch: int, n: int, seed: int
) -> list[torch.Tensor]:
    """``n`` batches ``(batch, 1, d, h, w)`` of patches of ``volumes``: centred on a node
    voxel with probability ``foreground`` (a strong set with masks), as training draws its
    ROI patches, else placed uniformly."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = []
        for i in rng.integers(len(volumes), size=batch):
            image = volumes.image(int(i))
            mask = volumes.mask(int(i)) if foreground > 0 else np.zeros(image.shape, bool)
            corner = patch_corner(mask, patch, foreground, rng)
            items.append(crop_padded(image, corner, patch))
        out.append(torch.from_numpy(np.stack(items)[:, None].copy()))
    return out


def _interleave(*lists: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for group in zip(*lists, strict=True):
        yield from group


def _bn_shift(model: MultiTaskNet, reference: MultiTaskNet) -> dict[str, float]:
    """How far ``model``'s running statistics lie from ``reference``'s, per part (encoder,
    decoder): the mean over its batch norms of the channel-mean ``|μ − μ_ref| / σ_ref``
    (``mean_*``), the largest such layer value (``max_mean_*``), and the mean over its
    batch norms of the channel-mean ``|log(var / var_ref)|`` (``logvar_*``)."""
    ref = {n: m for n, m in reference.named_modules() if isinstance(m, _BatchNorm)}
    shift: dict[str, list[float]] = {"decoder": [], "encoder": []}
    logvar: dict[str, list[float]] = {"decoder": [], "encoder": []}
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or m.running_mean is None:
            continue
        r = ref[name]
        assert m.running_var is not None and r.running_mean is not None
        assert r.running_var is not None
        part = "decoder" if name.startswith("decoder") else "encoder"
        z = (m.running_mean - r.running_mean).abs() / (r.running_var + r.eps).sqrt()
        shift[part].append(float(z.mean()))
        ratio = ((m.running_var + m.eps) / (r.running_var + r.eps)).log().abs()
        logvar[part].append(float(ratio.mean()))
    out: dict[str, float] = {}
    for part in ("encoder", "decoder"):
        if shift[part]:
            out[f"mean_{part}"] = round(float(np.mean(shift[part])), 4)
            out[f"max_mean_{part}"] = round(float(np.max(shift[part])), 4)
            out[f"logvar_{part}"] = round(float(np.mean(logvar[part])), 4)
    return out


def probe(run_dir: Path, n_batches: int, which: str, variants: list[str]) -> dict[str, Any]:
    config = load_run_config(run_dir)
    if which == "best":
        _, best, _ = load_model(run_dir, "best")
    else:  # last.pt's weights: also while the run trains
        state, _ = read_checkpoint(run_dir / "checkpoints" / "last.pt")
        best = build_model(config.model)
        best.load_state_dict(state["model"] if which == "student" else state["ema"]["model"])
    best.eval()
    zeta = float(config.propagation.roi_threshold)
    data = load_run_data(config, run_dir)
    strong = [data.volumes("strong", s, masks=True) for s in ("train", "val")]
    weak = data.volumes("weak", "train")
    tcfg = config.training
    assert tcfg.roi_patch is not None, "a run trained on ROI patches (training.roi_patch)"
    patch = tuple(reversed(tcfg.roi_patch))
    x, y, z = config.inference.bag_tile or config.inference.tile
    tile = (z, y, x)
    patches = _patch_batches(
        strong[0], patch, tcfg.roi_foreground, tcfg.strong_batch_size, n_batches, 0
    )
    n_tiles = tcfg.batch_size * ((config.inference.bag_tiles or 8) + tcfg.bag_random)
    tiles = _patch_batches(weak, tile, 0.0, n_tiles, n_batches, 1) if len(weak) else []
    if not tiles:
        raise SystemExit(f"{run_dir}: no weak training scans to draw tiles from")
    inferer = make_inferer(config)
    roi = dict(forward=lambda m, x: m(x, roi=True))
    models = {"running": best}
    models["patches"] = update_bn(copy.deepcopy(best), patches, **roi)
    if "weak_tiles" in variants:
        models["weak_tiles"] = update_bn(copy.deepcopy(best), tiles, **roi)
    if "both" in variants:
        models["both"] = update_bn(copy.deepcopy(best), _interleave(patches, tiles), **roi)
    rows: dict[str, Any] = {}
    for name, model in models.items():
        if name not in variants:
            continue
        t0 = time.perf_counter()
        by_zeta, node_prob = _dice_by_zeta(model.eval(), strong, sorted({*ZETAS, zeta}), inferer)
        dice = by_zeta[f"{zeta:g}"]
        rows[name] = {
            "dice_strong_train_val": dice,
            "dice_by_zeta": by_zeta,
            "mean_prob_on_nodes": node_prob,
            "n_scans": sum(map(len, strong)),
            "shift_from_patches": _bn_shift(model, models["patches"]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"{name:>10}: Dice {dice:.3f} (by ζ {by_zeta}; mean p on nodes {node_prob:.3f}) "
            f"shift {rows[name]['shift_from_patches']}",
            flush=True,
        )
    return {"run": str(run_dir), "model": which, "zeta": zeta, "batches": n_batches, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--model", choices=("best", "student", "ema"), default="best")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="statistics scored"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result = probe(args.run, args.batches, args.model, args.variants)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
