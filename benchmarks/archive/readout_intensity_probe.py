"""Fourteenth round of the dev log's section 7.2 (docs/dev-log-2026-11-25_to_2026-12-03.md):
do first-order intensity readings of the
nodes the ROI map finds add to the readout's seven readings (which are all volumes)?
Malignant nodes are heterogeneous or necrotic more often than benign ones, in CT as in the
phantom; the seven readings cannot see that, and the classifier, fitted on 67-90 scans,
may not have learned it. For the k voxels of largest ROI probability (k = 20 and 80, as in
``evaluation.roi_readout``'s top-k readings), on the model's grid and in its normalised
intensity units: the probability-weighted mean and standard deviation of the image, and
the 10th percentile of its values. For each fold of a ``compare --cv`` repeat the readout
is fitted on the fold's weak train + val patients with and without these six readings
(``benchmarks/archive/readout_shape_probe.probe``); prints the pooled held-out AUC of each,
averaged with the classifier and alone, per strategy.
Usage: python benchmarks/archive/readout_intensity_probe.py CV_REPEAT_DIR [...] (set LYMPHDX_CACHE)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from readout_shape_probe import probe  # noqa: E402

KS = (20, 80)
NAMES = [f"{s}_top{k}" for k in KS for s in ("wmean", "wstd", "p10")]


def intensity_readings(p: np.ndarray, image: np.ndarray, spacing_zyx: np.ndarray) -> list[float]:
    """Weighted mean, weighted sd and 10th percentile of ``image`` over the k most probable
    voxels of ``p`` (both ``(D, H, W)``), for each k of ``KS``."""
    order = np.argsort(p.ravel())[::-1]
    out = []
    for k in KS:
        idx = order[:k]
        w = p.ravel()[idx].astype(np.float64) + 1e-6
        x = image.ravel()[idx].astype(np.float64)
        m = float((w * x).sum() / w.sum())
        out += [m, float(np.sqrt((w * (x - m) ** 2).sum() / w.sum())), float(np.percentile(x, 10))]
    return out


def main() -> None:
    torch.set_num_threads(1)
    probe(sys.argv[1:], intensity_readings, NAMES)


if __name__ == "__main__":
    main()
