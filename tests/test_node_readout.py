"""``evaluation.readout: nodes``: MIL over the ROI map's nodes (engine.node_readout), against
planted nodes and an independent regression."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lymphdx.engine.node_readings import NODE_FEATURES, node_table
from lymphdx.engine.node_readout import NODES_C, NodeReadout, fit_node_readout, read_nodes
from lymphdx.engine.roi_readout import READOUTS, RoiReadout

F = len(NODE_FEATURES)
MM = (2.5, 1.5, 1.5)


def _scans(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """``n`` scans of 2-6 benign nodes (readings ~ N(0, 1)); each positive scan has one more
    node, planted at a random place in its table, whose first reading is +5."""
    tables, labels, planted = [], [], []
    for i in range(n):
        t = rng.normal(size=(int(rng.integers(2, 7)), F))
        y = i % 2
        where = -1
        if y:
            node = rng.normal(size=(1, F))
            node[0, 0] += 5.0
            where = int(rng.integers(0, len(t) + 1))
            t = np.insert(t, where, node, axis=0)
        tables.append(t)
        labels.append(y)
        planted.append(where)
    return tables, np.array(labels), planted


def test_mil_finds_the_planted_node_and_equals_a_regression_on_the_witnesses() -> None:
    """The witnesses converge to the planted nodes; the fitted regression is then sklearn's
    (standardised on all nodes, balanced classes) on benign nodes against planted ones;
    new scans are ranked by their planted node."""
    rng = np.random.default_rng(0)
    tables, labels, planted = _scans(100, rng)
    head = fit_node_readout(tables, labels, MM)
    for t, y, w in zip(tables, labels, planted, strict=True):
        if y:
            assert int(np.argmax(head.node_probability(t))) == w
    nodes = np.concatenate(tables)
    scaler = StandardScaler().fit(nodes)
    neg = np.concatenate([t for t, y in zip(tables, labels, strict=True) if y == 0])
    pos = np.stack([t[w] for t, y, w in zip(tables, labels, planted, strict=True) if y])
    x, y = scaler.transform(np.r_[neg, pos]), np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    lr = LogisticRegression(C=NODES_C, class_weight="balanced", max_iter=2000).fit(x, y)
    np.testing.assert_allclose(head.coef, lr.coef_[0], rtol=1e-3, atol=1e-4)
    want = [lr.predict_proba(scaler.transform(t))[:, 1].max() for t in tables]
    np.testing.assert_allclose(head.probability(tables), want, rtol=1e-3, atol=1e-5)
    test_tables, test_labels, _ = _scans(40, np.random.default_rng(1))
    p = head.probability(test_tables)
    assert p[test_labels == 1].min() > np.median(p[test_labels == 0])
    assert head.train_auc > 0.95 and head.n_train == 100 and head.n_pos == 50


def test_probability_is_the_most_suspicious_node_and_empty_scans_read_zero() -> None:
    head = NodeReadout(
        mean=np.zeros(F),
        scale=np.ones(F),
        coef=np.eye(F)[0],
        intercept=0.0,
        voxel_mm=MM,
        n_train=2,
        n_pos=1,
        train_auc=1.0,
    )
    table = np.zeros((3, F))
    table[:, 0] = [-1.0, 2.0, 0.5]
    sigmoid = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(head.probability([table, np.zeros((0, F))]), [sigmoid, 0.0])
    np.testing.assert_allclose(
        head.combine(np.array([0.2, 0.4]), [table, table[:0]]),
        [
            (0.2 + sigmoid) / 2,
            0.2,
        ],
    )


def test_json_round_trip_and_kinds_kept_apart() -> None:
    tables, labels, _ = _scans(20, np.random.default_rng(2))
    head = fit_node_readout(tables, labels, MM)
    back = NodeReadout.from_json(json.loads(json.dumps(head.to_json())))
    np.testing.assert_allclose(back.probability(tables), head.probability(tables))
    assert NodeReadout.from_json(replace(head, weight=1.0).to_json()).weight == 1.0
    assert back.voxel_mm == MM and READOUTS["nodes"].load == NodeReadout.from_json
    with pytest.raises(ValueError, match="not a node readout"):
        NodeReadout.from_json({**head.to_json(), "kind": "map"})
    with pytest.raises(ValueError):
        RoiReadout.from_json(head.to_json())
    with pytest.raises(ValueError, match="all of one class"):
        fit_node_readout(tables, np.zeros(20), MM)
    with pytest.raises(ValueError, match="all of one class"):  # no node in the positives
        empty = [t if y == 0 else t[:0] for t, y in zip(tables, labels, strict=True)]
        fit_node_readout(empty, labels, MM)


def test_a_readout_on_some_readings_reads_their_columns_of_whole_tables() -> None:
    """Fitted on a subset of the readings (as a readout stored before a reading was added),
    the readout equals one fitted on tables of those columns alone, reads whole tables,
    and its JSON keeps its readings; unknown readings are refused."""
    tables, labels, planted = _scans(100, np.random.default_rng(3))
    some = NODE_FEATURES[:4]  # the planted reading (the first) among them
    head = fit_node_readout(tables, labels, MM, some)
    assert head.features == some and head.coef.shape == (4,)
    neg = np.concatenate([t for t, y in zip(tables, labels, strict=True) if y == 0])[:, :4]
    pos = np.stack([t[w, :4] for t, y, w in zip(tables, labels, planted, strict=True) if y])
    scaler = StandardScaler().fit(np.concatenate(tables)[:, :4])
    x, y = scaler.transform(np.r_[neg, pos]), np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    lr = LogisticRegression(C=NODES_C, class_weight="balanced", max_iter=2000).fit(x, y)
    want = [lr.predict_proba(scaler.transform(t[:, :4]))[:, 1].max() for t in tables]
    np.testing.assert_allclose(head.probability(tables), want, rtol=1e-3, atol=1e-5)
    back = NodeReadout.from_json(json.loads(json.dumps(head.to_json())))
    assert back.features == some
    np.testing.assert_allclose(back.probability(tables), head.probability(tables))
    with pytest.raises(ValueError, match="not a node readout"):
        NodeReadout.from_json({**head.to_json(), "features": ["short_mm", "colour"]})


def test_read_nodes_reads_each_scan_of_a_batch() -> None:
    roi = torch.zeros(2, 1, 12, 16, 16)
    roi[0, 0, 4:8, 4:9, 4:9] = 0.9
    image = torch.randn(2, 1, 12, 16, 16)
    tables = read_nodes(roi, image, MM)
    assert [len(t) for t in tables] == [1, 0]
    np.testing.assert_allclose(tables[0], node_table(roi[0, 0].numpy(), image[0, 0].numpy(), MM))
    with pytest.raises(ValueError, match="differ"):
        read_nodes(roi, image[:1], MM)
