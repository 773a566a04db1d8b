"""The node readout (``evaluation.readout: nodes``): multiple-instance learning over the
nodes that the ROI map finds, the way a radiologist reads a scan, node by node.

Each node is read by ``engine.node_readings`` (short and long axis, roundness, volume,
margin fill, the map's confidence, the image's mean, spread, low tail and core drop, and
the image in a shell around it, which tells a node in fat from a bowel loop). A
logistic regression on a node's readings gives its probability of being metastatic, and
a scan's probability is that of its most suspicious node (0 for a scan where the map
finds none): one malignant node makes the scan positive, the definition of the weak
set's label.

Only scan labels are known, so the regression is fitted by witness MIL (MI-SVM's
alternation, Andrews et al., NIPS 2002, with a logistic loss): every node of a negative
scan is a negative; in each positive scan, the node that the current regression finds
most suspicious is the positive (in the first round all of them), for ``ROUNDS`` rounds.
About a dozen readings and a strong L2 penalty: a head that about a hundred training scans
can fit without learning the patients, which the network's classifier does (BENCHMARKS.md
§4.2, "why the tile classifier fails").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lymphdx.engine.node_readings import NODE_FEATURES, node_table
from lymphdx.stats.metrics import auc

__all__ = ["NODES_C", "ROUNDS", "NodeReadout", "fit_node_readout", "read_nodes"]

NODES_C = 0.3  # inverse L2 strength, on standardised readings
ROUNDS = 5  # witness rounds
THRESHOLD = 0.5  # the ROI map's threshold that outlines a node


def read_nodes(
    roi: torch.Tensor, image: torch.Tensor, voxel_mm: Sequence[float]
) -> list[np.ndarray]:
    """One node table ``(n_i, len(NODE_FEATURES))`` per scan of ROI maps ``roi`` and their
    images ``image``, both ``(B, 1, D, H, W)``, voxel size ``voxel_mm`` in (D, H, W)."""
    if roi.shape != image.shape or roi.ndim != 5:
        raise ValueError(f"roi {tuple(roi.shape)} and image {tuple(image.shape)} differ")
    maps = roi.detach().float().cpu().numpy()
    images = image.detach().float().cpu().numpy()
    return [node_table(m[0], x[0], voxel_mm, THRESHOLD) for m, x in zip(maps, images, strict=True)]


@dataclass(frozen=True)
class NodeReadout:
    """A fitted node readout: standardisation and a logistic regression on a node's
    readings; the voxel size it reads maps at."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (F,)
    intercept: float
    voxel_mm: tuple[float, float, float]  # (D, H, W)
    n_train: int
    n_pos: int
    train_auc: float
    weight: float = 0.5  # the readout's share of the scan probability (evaluation.readout_weight)
    features: tuple[str, ...] = NODE_FEATURES  # the readings it uses, of NODE_FEATURES

    kind = "nodes"

    def read(self, roi: torch.Tensor, image: torch.Tensor) -> list[np.ndarray]:
        """The node tables of ``roi`` and ``image`` ``(B, 1, D, H, W)`` (``read_nodes``)."""
        return read_nodes(roi, image, self.voxel_mm)

    def node_probability(self, table: np.ndarray) -> np.ndarray:
        """``(n,)`` each node's probability of being metastatic, of a table
        ``(n, len(NODE_FEATURES))`` (the columns of ``features`` are read)."""
        columns = [NODE_FEATURES.index(f) for f in self.features]
        z = (np.asarray(table, dtype=np.float64)[:, columns] - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def probability(self, readings: Sequence[np.ndarray]) -> np.ndarray:
        """``(N,)`` each scan's probability: its most suspicious node's (0 without one)."""
        return np.array(
            [float(self.node_probability(t).max()) if len(t) else 0.0 for t in readings]
        )

    def combine(self, classifier: np.ndarray, readings: Sequence[np.ndarray]) -> np.ndarray:
        """``(N,)`` the mean of ``classifier`` ``(N,)`` and the readout's probability, the
        readout weighted ``weight``."""
        w = self.weight
        return (1 - w) * np.asarray(classifier, dtype=np.float64) + w * self.probability(readings)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (``from_json`` reads it back)."""
        return {
            "kind": self.kind,
            "features": list(self.features),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "voxel_mm": list(self.voxel_mm),
            "n_train": self.n_train,
            "n_pos": self.n_pos,
            "train_auc": self.train_auc,
            "C": NODES_C,
            "rounds": ROUNDS,
            "threshold": THRESHOLD,
            "weight": self.weight,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeReadout:
        """The readout written by ``to_json`` (one fitted before a reading was added reads
        the readings it was fitted on); ``ValueError`` for another kind or readings."""
        features = tuple(d.get("features", ()))
        if d.get("kind") != cls.kind or not features or not set(features) <= set(NODE_FEATURES):
            raise ValueError(f"not a node readout of readings among {NODE_FEATURES}")
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            scale=np.asarray(d["scale"], dtype=np.float64),
            coef=np.asarray(d["coef"], dtype=np.float64),
            intercept=float(d["intercept"]),
            voxel_mm=tuple(float(v) for v in d["voxel_mm"]),  # type: ignore[arg-type]
            n_train=int(d["n_train"]),
            n_pos=int(d["n_pos"]),
            train_auc=float(d["train_auc"]),
            weight=float(d.get("weight", 0.5)),
            features=features,
        )


def fit_node_readout(
    readings: Sequence[np.ndarray],
    labels: np.ndarray,
    voxel_mm: Sequence[float],
    features: Sequence[str] = NODE_FEATURES,
) -> NodeReadout:
    """Fit the node readout by witness MIL on training scans' node tables ``readings``
    ``(n_i, len(NODE_FEATURES))`` and scan ``labels`` ``(N,)``, on the readings
    ``features``; ``ValueError`` when the scans with a node are all of one class."""
    labels = np.asarray(labels).astype(int)
    columns = [NODE_FEATURES.index(f) for f in features]
    neg = [t for t, y in zip(readings, labels, strict=True) if y == 0 and len(t)]
    pos = [t for t, y in zip(readings, labels, strict=True) if y == 1 and len(t)]
    if not neg or not pos:
        raise ValueError(
            "the training scans in which the ROI map finds a node are all of one class"
        )
    scaler = StandardScaler().fit(np.concatenate(neg + pos)[:, columns])
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    head = NodeReadout(
        mean=scaler.mean_.astype(np.float64),
        scale=scale.astype(np.float64),
        coef=np.zeros(len(columns)),
        intercept=0.0,
        voxel_mm=tuple(float(v) for v in voxel_mm),  # type: ignore[arg-type]
        n_train=int(len(labels)),
        n_pos=int(labels.sum()),
        train_auc=0.0,
        features=tuple(features),
    )
    witnesses = pos
    for round_ in range(ROUNDS):
        if round_:
            witnesses = [t[[int(np.argmax(head.node_probability(t)))]] for t in pos]
        x = (np.concatenate(neg + witnesses)[:, columns] - head.mean) / head.scale
        y = np.r_[np.zeros(sum(map(len, neg))), np.ones(sum(map(len, witnesses)))]
        lr = LogisticRegression(C=NODES_C, class_weight="balanced", max_iter=2000).fit(x, y)
        head = replace(head, coef=lr.coef_[0].astype(np.float64), intercept=float(lr.intercept_[0]))
    return replace(head, train_auc=auc(labels, head.probability(readings)))
