"""Issue 29: scan-level heads on a run's stored ROI maps (``issue29_node_maps.py``), scored
out of fold without training the network again.

Each ``MAPS`` folder holds one run's weak scans (train, val, test). In each, a head is
fitted on the train + val patients and scores the test patients; the test scores of all
folders are pooled (the development folds' out-of-fold patients). Heads:

* ``classifier``: the network's classifier alone.
* ``map``: today's readout (``engine.roi_readout``: a regression on the map's voxel
  readings), averaged with the classifier, as ``evaluation.roi_readout: true`` scores.
* ``nodes``: multiple-instance learning over the map's nodes (``engine.node_readout``): a
  regression on each node's readings (``engine.node_readings``), fitted with the nodes of
  negative scans as negatives and, in each positive scan, its highest-scoring node as the
  positive (the witness; all of its nodes in the first round), five rounds; a scan's
  score is its highest node's. Averaged with the classifier (``nodes``) and alone (``nodes_alone``).
* ``nodes_drop``, ``nodes_xq`` (when the folder holds the strong set's training and
  validation scans, ``issue29_node_maps.py --domain strong``): a *nodeness* regression,
  fitted on the strong scans' regions labelled by their masks (a region is a node when
  ``NODE_SHARE`` of it lies in the mask), gives each weak region its probability q of
  being a node at all. ``nodes_drop`` fits and reads the node head on the regions with
  q ≥ 0.5 only; ``nodes_xq`` reads a scan as its highest p × q (``nodes_alone``'s p).
* ``nodes_noshell``: ``nodes_alone`` without the shell readings (``shell_mean``,
  ``shell_sd``: the image around each node), the readings of the first node readout.

Rule declared before the summary was first run (2026-12-07): a node head replaces the
``map`` readout when its pooled out-of-fold AUC on seed 0's development folds is higher;
of the two, the higher. DeLong's paired test against ``map`` is reported beside it.

Rule declared before ``nodes_noshell`` was first scored (2026-12-07, fifth session, after
the default data's CV fold 2 showed bowel-like false regions read as metastatic): the
shell readings stay in the node readout when ``nodes_alone``'s pooled out-of-fold AUC on
seed 0's development folds is higher than ``nodes_noshell``'s; otherwise they go.

Rule declared before ``nodes_drop`` and ``nodes_xq`` were first scored (2026-12-07, fifth
session, after the default data's fold 2 showed that most of the map's regions on the weak
set are not nodes): the strong set's nodeness becomes a part of the node readout (a later
change) when the higher of ``nodes_drop`` and ``nodes_xq`` has a pooled out-of-fold AUC on
seed 0's development folds above ``nodes_alone``'s; that one is the form adopted.

    python benchmarks/issue29_scan_heads.py MAPS [MAPS ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lymphdx.engine.node_readings import NODE_FEATURES, node_regions, node_table
from lymphdx.engine.node_readout import fit_node_readout
from lymphdx.engine.roi_readout import fit_readout, readout_features
from lymphdx.stats.metrics import auc, bootstrap_auc_ci, delong_paired

VOXEL_MM = (2.5, 1.5, 1.5)  # recorded in the fitted readout only


NODE_SHARE = 0.3  # a strong region is a node when this share of it lies in the mask


@dataclass
class Scans:
    ids: list[str]
    split: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) int
    cls: np.ndarray  # (N,)
    map_features: np.ndarray  # (N, F)
    nodes: list[np.ndarray]  # N tables (n_i, len(NODE_FEATURES))
    nodeness: tuple[np.ndarray, np.ndarray] | None = None  # strong regions' readings, is-node


def read_strong(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The strong scans' regions of a maps folder: readings ``(R, F)`` and whether each is
    a node ``(R,)`` by its mask; ``None`` without strong scans. Cached beside them."""
    files = sorted(folder.glob("S*.npz"))
    if not files:
        return None
    cache = folder / "strong_readings.npz"
    if cache.exists():
        c = np.load(cache)
        if int(c["n_scans"]) == len(files) and c["x"].shape[1] == len(NODE_FEATURES):
            return c["x"], c["y"]
    xs, ys = [], []
    for f in files:
        d = np.load(f)
        roi = d["roi"].astype(np.float32) / 255.0
        labels, order = node_regions(roi)
        xs.append(node_table(roi, d["image"].astype(np.float32), d["voxel_mm"]))
        ys.extend(float((d["mask"][labels == lab] > 0).mean()) >= NODE_SHARE for lab in order)
    x, y = np.concatenate(xs), np.asarray(ys, dtype=np.int64)
    np.savez(cache, x=x, y=y, n_scans=len(files))
    return x, y


def nodeness_model(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """q: each region's probability of being a node, fitted on strong regions ``x`` ``(R,
    F)`` labelled ``y`` (standardised, C 0.3, balanced, as the node head)."""
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=0.3, class_weight="balanced", max_iter=2000)
    lr.fit(scaler.transform(x), y)
    print(
        f"  nodeness: {len(y)} strong regions, {int(y.sum())} nodes, training AUC "
        f"{auc(y, lr.predict_proba(scaler.transform(x))[:, 1]):.3f}"
    )

    def q(table: np.ndarray) -> np.ndarray:
        return lr.predict_proba(scaler.transform(table))[:, 1] if len(table) else np.zeros(0)

    return q


def read_folder(folder: Path) -> Scans:
    """The scans of one maps folder; node tables and map readings are cached beside them."""
    cache = folder / "readings.npz"
    files = sorted(folder.glob("W*.npz"))
    if cache.exists():
        c = np.load(cache, allow_pickle=True)
        widths = {t.shape[1] for t in c["nodes"]}
        if list(c["ids"]) == [f.stem for f in files] and widths == {len(NODE_FEATURES)}:
            return Scans(
                list(c["ids"]),
                c["split"],
                c["label"],
                c["cls"],
                c["map"],
                list(c["nodes"]),
                read_strong(folder),
            )
    ids, split, label, cls, feats, nodes = [], [], [], [], [], []
    for f in files:
        d = np.load(f)
        roi = d["roi"].astype(np.float32) / 255.0
        image = d["image"].astype(np.float32)
        ids.append(f.stem)
        split.append(str(d["split"]))
        label.append(int(d["label"]))
        cls.append(float(d["cls"]))
        feats.append(
            readout_features(torch.from_numpy(roi)[None], torch.from_numpy(image)[None])[0]
        )
        nodes.append(node_table(roi, image, d["voxel_mm"]))
    table = np.empty(len(nodes), dtype=object)
    table[:] = nodes
    np.savez(cache, ids=ids, split=split, label=label, cls=cls, map=np.stack(feats), nodes=table)
    return Scans(
        ids,
        np.asarray(split),
        np.asarray(label),
        np.asarray(cls),
        np.stack(feats),
        nodes,
        read_strong(folder),
    )


def heads(s: Scans) -> dict[str, np.ndarray]:
    """Every head's scores of the test patients of one folder, fitted on its others."""
    tr, te = s.split != "test", s.split == "test"
    readout = fit_readout(s.map_features[tr], s.label[tr])
    train_nodes = [t for t, m in zip(s.nodes, tr, strict=True) if m]
    node_head = fit_node_readout(train_nodes, s.label[tr], VOXEL_MM)
    test_nodes = [t for t, m in zip(s.nodes, te, strict=True) if m]
    nodes = node_head.probability(test_nodes)
    noshell = fit_node_readout(train_nodes, s.label[tr], VOXEL_MM, NODE_FEATURES[:-2])
    print(
        f"  training AUC: classifier {auc(s.label[tr], s.cls[tr]):.3f}, "
        f"map {readout.train_auc:.3f}, nodes {node_head.train_auc:.3f}, "
        f"nodes without shell {noshell.train_auc:.3f}"
    )
    scores = {
        "classifier": s.cls[te],
        "map": readout.combine(s.cls[te], s.map_features[te]),
        "map_alone": readout.probability(s.map_features[te]),
        "nodes": 0.5 * (s.cls[te] + nodes),
        "nodes_alone": nodes,
        "nodes_noshell": noshell.probability(test_nodes),
    }
    if s.nodeness is not None:
        nodeness = nodeness_model(*s.nodeness)
        qs = [nodeness(t) for t in s.nodes]  # each scan's regions' q, once
        kept = [t[q >= 0.5] for t, q in zip(s.nodes, qs, strict=True)]
        drop = fit_node_readout(
            [t for t, m in zip(kept, tr, strict=True) if m], s.label[tr], VOXEL_MM
        )
        scores["nodes_drop"] = drop.probability([t for t, m in zip(kept, te, strict=True) if m])
        scores["nodes_xq"] = np.array(
            [
                float((node_head.node_probability(t) * q).max()) if len(t) else 0.0
                for t, q, m in zip(s.nodes, qs, te, strict=True)
                if m
            ]
        )
        share = np.mean([float((q >= 0.5).mean()) for q in qs if len(q)])
        print(
            f"  nodeness: weak regions kept at q >= 0.5: {share:.2f} (mean per scan); "
            f"nodes_drop training AUC {drop.train_auc:.3f}"
        )
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("maps", type=Path, nargs="+")
    args = ap.parse_args()
    pooled: dict[str, list[np.ndarray]] = {}
    labels = []
    for folder in args.maps:
        s = read_folder(folder)
        te = s.split == "test"
        n_nodes = [len(t) for t in s.nodes]
        print(f"{folder}: {int(te.sum())} test patients, nodes/scan median {np.median(n_nodes)}")
        scores = heads(s)
        for name, v in scores.items():
            print(f"  {name:12s} test AUC {auc(s.label[te], v):.3f}")
            pooled.setdefault(name, []).append(v)
        labels.append(s.label[te])
    y = np.concatenate(labels)
    print(f"pooled out of fold ({len(y)} patients, {int(y.sum())} positive):")
    base = np.concatenate(pooled["map"])
    for name, parts in pooled.items():
        v = np.concatenate(parts)
        lo, hi = bootstrap_auc_ci(y, v, seed=0)[:2]
        line = f"  {name:12s} AUC {auc(y, v):.3f} [{lo:.3f}, {hi:.3f}]"
        if name != "map":
            d = delong_paired(y, v, base)
            line += f"  vs map: {d}"
        print(line)


if __name__ == "__main__":
    main()
