"""Thirteenth round of the dev log's section 7.2 (docs/dev-log-2026-11-25_to_2026-12-03.md):
do the shapes of the ROI map's nodes add
to the readout's seven readings? For each fold of a ``compare --cv`` repeat, the
readout (``evaluation.roi_readout``'s seven readings) is fitted on the fold's weak train
+ val patients with and without three shape readings of the flip-averaged map's
connected components (p > 0.5): the largest short axis over the components, the short
axis of the component of largest soft volume, and the number of components with a
short axis of at least 10 mm (the radiologist's rule). Axes from each component's
probability-weighted second moments (a solid ellipsoid's variance along a semi-axis a is
a²/5), in mm. Prints the pooled held-out AUC of each readout averaged with the
classifier, per strategy.
Usage: python benchmarks/archive/readout_shape_probe.py CV_REPEAT_DIR [...] (set LYMPHDX_CACHE)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from lymphdx.core.domains import WEAK
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.propagation import _my_batches
from lymphdx.engine.roi_readout import fit_readout, readout_features
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.engine.teacher import predict_with_tta


def shape_readings(p: np.ndarray, spacing_zyx: np.ndarray) -> list[float]:
    """Largest short axis, short axis of the largest node, nodes >= 10 mm short axis."""
    labels, n = ndimage.label(p > 0.5)
    shorts, vols = [0.0], [0.0]
    count = 0
    for i in range(1, n + 1):
        idx = np.argwhere(labels == i)
        w = p[labels == i].astype(np.float64)
        x = idx * spacing_zyx
        mu = (w[:, None] * x).sum(0) / w.sum()
        d = x - mu
        cov = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w.sum()
        # a voxel's own extent: add the variance of a uniform voxel (s^2 / 12) per axis
        cov = cov + np.diag(spacing_zyx**2 / 12.0)
        lam = np.linalg.eigvalsh(cov)
        short = 2 * np.sqrt(5 * max(lam[0], 0.0))
        shorts.append(short)
        vols.append(float(w.sum()))
        count += short >= 10.0
    return [max(shorts), shorts[int(np.argmax(vols))], float(count)]


Extra = Callable[[np.ndarray, np.ndarray, np.ndarray], list[float]]


def _shape_extra(p: np.ndarray, image: np.ndarray, spacing_zyx: np.ndarray) -> list[float]:
    return shape_readings(p, spacing_zyx)


@torch.no_grad()
def scan_readings(
    run: Path, split: str, extra: Extra = _shape_extra
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels ``(N,)``, classifier probabilities ``(N,)`` and readings ``(N, 7 + E)``: the
    seven of ``evaluation.roi_readout`` and ``extra(map, image, spacing)`` of each scan
    (map and image ``(D, H, W)`` on the model's grid, the map flip-averaged)."""
    config, model, _ = load_model(run)
    volumes = load_run_data(config, run, need_strong=False).volumes("weak", split)
    spacing_zyx = np.array(config.data.spacing[::-1], dtype=np.float64)
    cls, feats = [], []
    for images in _my_batches(model, volumes, 4, DistContext(), WEAK):
        out = predict_with_tta(model, images, roi=True, flips=True)
        base = readout_features(out["roi"], images)[:, :7]  # the map's seven
        for b in range(images.shape[0]):
            more = extra(out["roi"][b, 0].numpy(), images[b, 0].numpy(), spacing_zyx)
            feats.append(np.r_[base[b], more])
        cls.append(out["cls"].numpy())
    return volumes.labels, np.concatenate(cls), np.array(feats)


def probe(repeats: list[str], extra: Extra, names: list[str]) -> dict[str, dict[str, float]]:
    """Pooled held-out AUC, per repeat and strategy, of the seven readings, the seven plus
    ``extra``'s readings (``names``) and the extra alone, each averaged with the
    classifier and alone, and of each extra reading as a score."""
    n = len(names)
    report = {}
    for repeat in repeats:
        for strategy in ("multitask", "ssmdmt"):
            ys, scores = [], {}
            for run in sorted(Path(repeat).glob(f"fold*/{strategy}/seed*")):
                tr = [scan_readings(run, s, extra) for s in ("train", "val")]
                y_te, c_te, f_te = scan_readings(run, "test", extra)
                y_tr = np.concatenate([t[0] for t in tr])
                f_tr = np.concatenate([t[2] for t in tr])
                out = {"cls": c_te}
                for name, cols in (
                    ("seven", slice(0, 7)),
                    ("seven+extra", slice(0, 7 + n)),
                    ("extra", slice(7, 7 + n)),
                ):
                    ro = fit_readout(f_tr[:, cols], y_tr)
                    out[name] = ro.probability(f_te[:, cols])
                    out[f"avg_{name}"] = 0.5 * (c_te + out[name])
                for j, nm in enumerate(names):
                    out[nm] = f_te[:, 7 + j]
                ys.append(y_te)
                for k, v in out.items():
                    scores.setdefault(k, []).append(v)
            y = np.concatenate(ys)
            key = f"{repeat} {strategy}"
            report[key] = {
                k: round(roc_auc_score(y, np.concatenate(v)), 3) for k, v in scores.items()
            }
            print(json.dumps({key: report[key]}), flush=True)
    print(json.dumps(report, indent=1))
    return report


def main() -> None:
    torch.set_num_threads(1)
    probe(sys.argv[1:], _shape_extra, ["max_short", "short_of_largest", "n_short10"])


if __name__ == "__main__":
    main()
