"""The ROI readout: a logistic regression on readings of the ROI map, fitted on a run's
weak training patients, averaged with the classifier's probability
(``evaluation.roi_readout``).

Why (docs/dev-log-2026-11-25_to_2026-12-03.md section 7.2, twelfth round): the ROI map is
taught by the other hospital's masks, not by this hospital's scan labels, so on the weak
training patients it is not fitted to their labels the way the classifier is (training AUC
0.97-0.99 for the map's readings and held-out 0.93, against 0.999 and 0.92 for the
classifier). Its readings, the soft volume of the scan's largest nodes at several sizes,
its largest probability and its total, are what a radiologist's size rule reads; first-order
intensity readings of the image under the map's most probable voxels (their weighted mean
and spread, and their low tail: the same log's section 7.2, fourteenth round) add what a
radiologist sees inside a node: whether the k most probable voxels lie inside solid
tissue (a node large enough to fill them) or straddle fat, heterogeneity, necrosis. A
regression fitted to them on the training patients can therefore be weighed against the
classifier without held-out patients: the two are averaged with equal weights, fixed a
priori, since the classifier's training-set scores would give any fitted weight to it
alone.

Only strategies that train the ROI decoder have a map to read; a run whose decoder found
no node (``read_roi_status``), or whose training patients are all of one class, keeps
the classifier alone and says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lymphdx.core.config import Config
from lymphdx.core.domains import WEAK
from lymphdx.core.files import write_json
from lymphdx.core.strategies import get_strategy
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.inferer import Inferer, WholeInferer, make_inferer
from lymphdx.engine.node_readings import NODE_FEATURES
from lymphdx.engine.node_readout import NodeReadout, fit_node_readout, read_nodes
from lymphdx.engine.propagation import _my_batches
from lymphdx.engine.roi_status import read_roi_status
from lymphdx.engine.run_data import RunData, data_to_fit
from lymphdx.engine.run_state import weights_stamp
from lymphdx.stats.metrics import auc

__all__ = [
    "FEATURES",
    "READOUT_C",
    "RoiReadout",
    "fit_readout",
    "readout_features",
    "run_readout",
    "score_volumes",
]

# the mean of the k largest ROI probabilities: a soft volume of the scan's largest nodes
# (k voxels of the grid; 20 of the quick grid's 5 x 5 x 6 mm voxels is a 17 mm sphere)
TOP_K = (5, 10, 20, 40, 80)
# the image under the k most probable voxels, in the model's normalised intensity units
IMAGE_K = (20, 80)
FEATURES = (
    tuple(f"roi_top{k}_mean" for k in TOP_K)
    + ("roi_max", "roi_log_sum")
    + tuple(f"image_top{k}_{s}" for k in IMAGE_K for s in ("wmean", "wsd", "p10"))
)
# inverse L2 strength of the regression, on standardised features (13 of them, ~70-100
# training patients)
READOUT_C = 0.3
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def readout_features(roi: torch.Tensor, image: torch.Tensor) -> np.ndarray:
    """``(B, F)`` float64 readings of ROI probability maps ``roi`` and the images they were
    read from, ``image``, both ``(B, 1, D, H, W)`` (or ``(B, D, H, W)``) on the model's
    grid, in ``FEATURES`` order: the logit of the mean of the k largest probabilities for
    each k of ``TOP_K`` (k is capped at the map's size), the logit of the largest, log(1 +
    the sum); then, for each k of ``IMAGE_K``, the image's mean and standard deviation
    over the k most probable voxels weighted by their probability, and the 10th
    percentile of its values there (linear interpolation, as ``numpy.percentile``)."""
    flat = roi.detach().float().flatten(1).cpu()
    img = image.detach().float().flatten(1).cpu()
    if img.shape != flat.shape:
        raise ValueError(f"roi {tuple(roi.shape)} and image {tuple(image.shape)} differ")
    k_max = min(max(max(TOP_K), max(IMAGE_K)), flat.shape[1])
    top, idx = flat.topk(k_max, dim=1)
    top = top.double().numpy()
    under = img.gather(1, idx).double().numpy()
    cols = [_logit(top[:, : min(k, k_max)].mean(1)) for k in TOP_K]
    cols.append(_logit(top[:, 0]))
    cols.append(np.log1p(flat.double().sum(1).numpy()))
    for k in IMAGE_K:
        w = top[:, : min(k, k_max)] + _EPS
        x = under[:, : min(k, k_max)]
        mean = (w * x).sum(1) / w.sum(1)
        cols.append(mean)
        cols.append(np.sqrt((w * (x - mean[:, None]) ** 2).sum(1) / w.sum(1)))
        cols.append(np.percentile(x, 10, axis=1))
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class RoiReadout:
    """A fitted readout: standardisation, then a logistic regression, on ``FEATURES``."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (F,)
    intercept: float
    n_train: int
    n_pos: int
    train_auc: float
    weight: float = 0.5  # the readout's share of the scan probability (evaluation.readout_weight)

    kind = "map"

    def read(self, roi: torch.Tensor, image: torch.Tensor) -> np.ndarray:
        """The readings ``(B, F)`` of ``roi`` and ``image`` (``readout_features``)."""
        return readout_features(roi, image)

    def probability(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` readout probabilities of ``features`` ``(N, F)``."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def combine(self, classifier: np.ndarray, features: np.ndarray) -> np.ndarray:
        """``(N,)`` the scan's probability: the mean of ``classifier`` ``(N,)`` and the
        readout's probability of ``features`` ``(N, F)``, the readout weighted ``weight``."""
        w = self.weight
        return (1 - w) * np.asarray(classifier, dtype=np.float64) + w * self.probability(features)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``from_json`` reads it back)."""
        return {
            "kind": self.kind,
            "features": list(FEATURES),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "n_train": self.n_train,
            "n_pos": self.n_pos,
            "train_auc": self.train_auc,
            "C": READOUT_C,
            "weight": self.weight,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RoiReadout:
        """The readout written by ``to_json``; ``ValueError`` for another feature set."""
        if d.get("kind", cls.kind) != cls.kind or list(d.get("features", [])) != list(FEATURES):
            raise ValueError(f"readout of features {d.get('features')}, expected {FEATURES}")
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            scale=np.asarray(d["scale"], dtype=np.float64),
            coef=np.asarray(d["coef"], dtype=np.float64),
            intercept=float(d["intercept"]),
            n_train=int(d["n_train"]),
            n_pos=int(d["n_pos"]),
            train_auc=float(d["train_auc"]),
            weight=float(d.get("weight", 0.5)),
        )


def fit_readout(features: np.ndarray, labels: np.ndarray) -> RoiReadout:
    """Fit the readout on training patients' ``features`` ``(N, F)`` and ``labels``
    ``(N,)``; ``ValueError`` when the labels are all one class."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("the training patients are all of one class")
    scaler = StandardScaler().fit(features)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    z = (features - scaler.mean_) / scale
    lr = LogisticRegression(C=READOUT_C, max_iter=1000).fit(z, labels)
    readout = RoiReadout(
        mean=scaler.mean_.astype(np.float64),
        scale=scale.astype(np.float64),
        coef=lr.coef_[0].astype(np.float64),
        intercept=float(lr.intercept_[0]),
        n_train=int(len(labels)),
        n_pos=int(labels.sum()),
        train_auc=0.0,
    )
    return replace(readout, train_auc=auc(labels, readout.probability(features)))


Readout = RoiReadout | NodeReadout


@dataclass(frozen=True)
class ReadoutKind:
    """One readout of ``evaluation.readout``: how a batch is read (maps and images ``(B,
    1, D, H, W)``, the voxel size in mm in (D, H, W)), how a readout is fitted on training
    scans' readings and labels, and read back from its JSON."""

    read: Callable[[torch.Tensor, torch.Tensor, tuple[float, ...]], Sequence[Any]]
    fit: Callable[[list[Any], np.ndarray, tuple[float, ...]], Readout]
    load: Callable[[dict[str, Any]], Readout]
    features: tuple[str, ...]


READOUTS: dict[str, ReadoutKind] = {
    # the map's voxel readings (this module)
    "map": ReadoutKind(
        read=lambda roi, image, _mm: readout_features(roi, image),
        fit=lambda readings, labels, _mm: fit_readout(np.asarray(readings), labels),
        load=RoiReadout.from_json,
        features=FEATURES,
    ),
    # multiple-instance learning over the map's nodes (engine.node_readout)
    "nodes": ReadoutKind(
        read=read_nodes, fit=fit_node_readout, load=NodeReadout.from_json, features=NODE_FEATURES
    ),
}


def voxel_mm(config: Config) -> tuple[float, float, float]:
    """The working grid's voxel size in mm, (D, H, W) order (``data.spacing`` reversed;
    nominal with ``data.fit: resize``, whose spacing follows each scan)."""
    x, y, z = (float(v) for v in config.data.spacing)
    return (z, y, x)


@torch.no_grad()
def score_volumes(
    model: torch.nn.Module,
    volumes: VolumeSet,
    tta: bool,
    read: Callable[[torch.Tensor, torch.Tensor], Sequence[Any]],
    batch_size: int = 4,
    domain: int = WEAK,
    inferer: Inferer | None = None,
) -> tuple[np.ndarray, list[Any]]:
    """The classifier's probabilities ``(N,)`` and each volume's readings of its ROI map
    by ``read`` (a readout's ``read``, or a kind's with the voxel size bound), averaged
    with the left-right flip with ``tta``, in order, one pass of ``inferer`` (default
    ``WholeInferer``)."""
    inferer = inferer or WholeInferer()
    cls: list[np.ndarray] = [np.zeros(0)]
    readings: list[Any] = []
    n = inferer.batch_size(batch_size)
    for images in _my_batches(model, volumes, n, DistContext(), domain):
        out = inferer(model, images, roi=True, flips=tta)
        cls.append(out["cls"].double().cpu().numpy())
        readings.extend(read(out["roi"], images))
    return np.concatenate(cls), readings


def _fingerprint(checkpoint: Path, config: Config) -> dict[str, Any]:
    """What a stored readout was fitted for: the weights file, the flip setting, (when
    not ``whole``) the inferer and its settings, and (when not ``trained``) the batch-norm
    statistics."""
    stamp: dict[str, Any] = {
        **weights_stamp(checkpoint),
        "tta_flip": bool(config.evaluation.tta_flip),
    }
    # absent for whole, so that readouts stored before evaluation.inferer existed stay valid
    if config.evaluation.inferer != "whole":
        inference = config.inference.model_dump(mode="json")
        stamp["inferer"] = {"name": config.evaluation.inferer, **inference}
    if config.evaluation.bn_stats != "trained":  # absent for trained: older readouts stay valid
        stamp["bn_stats"] = config.evaluation.bn_stats
    return stamp


def readout_path(run_dir: Path, which: str = "best") -> Path:
    """Where the readout of ``checkpoints/<which>.pt`` is kept in the run folder."""
    return run_dir / ("roi_readout.json" if which == "best" else f"roi_readout@{which}.json")


def run_readout(
    run_dir: str | Path,
    config: Config,
    model: torch.nn.Module,
    data: RunData | None = None,
    which: str = "best",
    refit: bool = False,
) -> tuple[Readout | None, str]:
    """The readout (``evaluation.readout``: ``READOUTS``) of run ``run_dir``'s ``which``
    weights (``model``), and a line that says what it is or why there is none
    (``evaluation.roi_readout`` off, a strategy without the ROI task, a decoder that found
    no node, training patients of one class).

    Kept in ``roi_readout.json``; fitted again (on the weak set's train and val patients
    of ``data``, loaded when ``None``) when ``refit``, when missing, or when the weights,
    the flip setting, the readout's kind or its readings changed since.
    """
    run_dir = Path(run_dir)
    if not config.evaluation.roi_readout:
        return None, "off (evaluation.roi_readout: false)"
    if not get_strategy(config.strategy).trains_decoder:
        return None, f"none: {config.strategy} does not train the ROI decoder"
    status = read_roi_status(run_dir)
    if status is not None and not status["learned"]:
        where = f" (Dice {status['dice']:.3f} on {status.get('n_scans', '?')} {status['read_on']})"
        return None, f"none: the ROI decoder found no node{where}, so its map has nothing to read"
    name = config.evaluation.readout
    kind = READOUTS[name]
    path = readout_path(run_dir, which)
    stamp = _fingerprint(run_dir / "checkpoints" / f"{which}.pt", config)
    if path.exists() and not refit:
        stored = json.loads(path.read_text())
        # fitted for these weights and this flip setting, on this version's readings;
        # readouts written before evaluation.readout existed are of the map
        if (
            stored.get("fitted_for") == stamp
            and stored.get("kind", "map") == name
            and stored.get("features") == list(kind.features)
        ):
            readout = replace(kind.load(stored), weight=config.evaluation.readout_weight)
            return readout, _describe(readout)
    if data is None:
        what = f"ROI readout for its {which} weights"
        data = data_to_fit(config, run_dir, False, what, "evaluation.roi_readout: false")
    labels: list[np.ndarray] = []
    readings: list[Any] = []
    mm = voxel_mm(config)
    tta, inferer = config.evaluation.tta_flip, make_inferer(config)

    def read(roi: torch.Tensor, image: torch.Tensor) -> Sequence[Any]:
        return kind.read(roi, image, mm)

    for split in ("train", "val"):
        volumes = data.volumes("weak", split)
        if len(volumes):
            readings.extend(score_volumes(model, volumes, tta, read, inferer=inferer)[1])
            labels.append(volumes.labels)
    try:
        readout = kind.fit(readings, np.concatenate(labels), mm)
    except ValueError as err:
        return None, f"none: {err}"
    readout = replace(readout, weight=config.evaluation.readout_weight)
    write_json(path, {**readout.to_json(), "fitted_for": stamp})
    return readout, _describe(readout)


def _describe(readout: Readout) -> str:
    what = {"map": "the ROI map's readings", "nodes": "the ROI map's nodes (MIL)"}[readout.kind]
    share = (
        "in place of the classifier"
        if readout.weight == 1.0
        else f"averaged with the classifier (weight {readout.weight:g})"
    )
    return (
        f"fitted on {readout.n_train} weak training patients ({readout.n_pos} positive; "
        f"training AUC {readout.train_auc:.3f}) to {what}, {share}"
    )
