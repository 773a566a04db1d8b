"""Graph label propagation (Iscen et al., CVPR 2019) on embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lymphdx.core.errors import LymphdxError
from lymphdx.engine.graph_propagation import (
    GraphLPResult,
    graph_label_propagation,
    inverse_frequency_weights,
    knn_affinity,
    normalised_adjacency,
    pseudo_labels_for,
)


def _dense_reference(x: np.ndarray, labels: np.ndarray, n_classes: int, k: int, gamma, alpha):
    """Hand-built W_n, Y and the closed-form Z = (I − α W_n)^{-1} Y (loops, no shortcuts)."""
    n = len(x)
    v = []
    for row in x.tolist():
        norm = math.sqrt(sum(t * t for t in row))
        v.append([t / norm for t in row])
    A = np.zeros((n, n))
    for i in range(n):
        sims = []
        for j in range(n):
            if j != i:
                sims.append((sum(a * b for a, b in zip(v[i], v[j], strict=True)), j))
        sims.sort(reverse=True)
        for s, j in sims[:k]:
            A[i, j] = max(0.0, s) ** gamma
    W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            W[i, j] = A[i, j] + A[j, i]
    d = [sum(W[i]) for i in range(n)]
    Wn = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if d[i] > 0 and d[j] > 0:
                Wn[i, j] = W[i, j] / math.sqrt(d[i] * d[j])
    Y = np.zeros((n, n_classes))
    for c in range(n_classes):
        members = [i for i in range(n) if labels[i] == c]
        for i in members:
            Y[i, c] = 1.0 / len(members)
    Z = np.linalg.solve(np.eye(n) - alpha * Wn, Y)
    return A, Wn, Z


def test_toy_graph_matches_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)) + 0.5
    labels = np.array([0, -1, 1, -1, -1, 0, -1, 0])
    k, gamma, alpha = 3, 3.0, 0.9
    _, _, Z_ref = _dense_reference(x, labels, 2, k, gamma, alpha)

    res = graph_label_propagation(x, labels, n_classes=2, k=k, gamma=gamma, alpha=alpha, tol=1e-12)
    assert isinstance(res, GraphLPResult)
    assert res.scores.shape == (8, 2) and res.probs.shape == (8, 2)
    assert res.pseudo.shape == res.certainty.shape == (8,)
    assert res.converged and 1 <= res.iterations <= 20
    np.testing.assert_allclose(res.scores, Z_ref, atol=1e-6, rtol=0)

    # derived quantities from the reference Z, by the stated formulas
    p_ref = np.maximum(Z_ref, 0) / np.maximum(Z_ref, 0).sum(1, keepdims=True)
    np.testing.assert_allclose(res.probs, p_ref, atol=1e-6)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-12)
    assert (res.probs >= 0).all()
    np.testing.assert_array_equal(res.pseudo, p_ref.argmax(1))
    H = -(p_ref * np.log(p_ref)).sum(1)
    np.testing.assert_allclose(res.certainty, 1 - H / math.log(2), atol=1e-5)


def test_toy_graph_three_classes_default_iterations():
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(size=(9, 5)))
    labels = np.array([0, 1, 2, -1, -1, 0, -1, -1, 2])
    _, _, Z_ref = _dense_reference(x, labels, 3, 4, 3.0, 0.99)
    res = graph_label_propagation(x, labels, n_classes=3, k=4, tol=1e-12, max_iter=50)
    np.testing.assert_allclose(res.scores, Z_ref, atol=1e-6, rtol=0)
    assert res.class_weights.shape == (3,)


def _two_clusters(rng, n_per=20, extra=True):
    mu0 = np.zeros(16)
    mu0[0] = 3.0
    mu1 = np.zeros(16)
    mu1[1] = 3.0
    c0 = mu0 + 0.3 * rng.normal(size=(n_per, 16))
    c1 = mu1 + 0.3 * rng.normal(size=(n_per, 16))
    parts = [c0, c1]
    if extra:
        parts.append(np.stack([mu0, mu1, 0.5 * (mu0 + mu1)]))
    return np.concatenate(parts), mu0, mu1


def test_two_gaussian_clusters():
    rng = np.random.default_rng(3)
    n_per = 20
    x, _, _ = _two_clusters(rng, n_per)
    truth = np.array([0] * n_per + [1] * n_per + [0, 1, -1])
    labels = np.full(len(x), -1)
    labels[[0, 1, 2]] = 0
    labels[[n_per, n_per + 1, n_per + 2]] = 1
    clustered = np.flatnonzero((labels == -1) & (truth >= 0))

    # clusters alone (the paper's alpha=0.99): disconnected, so labels and certainty are clean
    res = graph_label_propagation(x[:-1], labels[:-1], k=10)
    np.testing.assert_array_equal(res.pseudo[clustered], truth[clustered])
    assert (res.certainty[clustered] > 0.5).all()

    # a point midway bridges the clusters; with a shorter diffusion (alpha=0.8) the clusters
    # stay confident, and the midpoint is the least certain point
    res = graph_label_propagation(x, labels, k=10, alpha=0.8)
    centre0, centre1, mid = 2 * n_per, 2 * n_per + 1, 2 * n_per + 2
    np.testing.assert_array_equal(res.pseudo[clustered], truth[clustered])
    assert (res.certainty[clustered] > 0.5).all()
    assert res.certainty[centre0] > res.certainty[mid]
    assert res.certainty[centre1] > res.certainty[mid]
    assert res.certainty[mid] < 0.5
    assert res.certainty.argmin() == mid
    assert np.isfinite(res.scores).all() and (res.certainty <= 1).all()


def test_knn_sparsity_and_symmetry():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6))
    x[3:, 0] += 5.0
    x[:3, 0] -= 5.0  # 3 points opposite the rest: only 2 neighbours with positive cosine
    k, gamma = 5, 3.0
    A = knn_affinity(x, k=k, gamma=gamma)
    assert A.shape == (30, 30)
    nnz_per_row = np.diff(A.tocsr().indptr)
    assert (nnz_per_row <= k).all()
    assert nnz_per_row[:3].tolist() == [2, 2, 2]  # the clamp max(0, ·) removed the others
    assert (A.diagonal() == 0).all()
    A_ref, Wn_ref, _ = _dense_reference(x, np.array([0, 1] + [-1] * 28), 2, k, gamma, 0.5)
    np.testing.assert_allclose(A.toarray(), A_ref, atol=1e-12)

    Wn = normalised_adjacency(A)
    W = (A + A.T).toarray()
    np.testing.assert_array_equal(W, W.T)
    np.testing.assert_allclose(Wn.toarray(), Wn.toarray().T, atol=1e-15)
    np.testing.assert_allclose(Wn.toarray(), Wn_ref, atol=1e-12)


def test_zero_degree_node_is_guarded():
    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(size=(10, 4)))
    x[4] = 0.0  # a zero embedding: no edges at all
    labels = np.array([0, 1, 0, 1, -1, -1, -1, -1, -1, -1])
    res = graph_label_propagation(x, labels, k=3)
    assert np.isfinite(res.scores).all() and np.isfinite(res.certainty).all()
    np.testing.assert_allclose(res.scores[4], 0.0)
    np.testing.assert_allclose(res.probs[4], [0.5, 0.5])
    assert res.certainty[4] == 0.0


def test_class_balance_weights_minority_gets_more():
    rng = np.random.default_rng(4)
    mu0, mu1 = np.zeros(16), np.zeros(16)
    mu0[0] = mu1[1] = 3.0
    big = mu0 + 0.3 * rng.normal(size=(17, 16))  # 2 labelled + 15 unlabelled
    small = mu1 + 0.3 * rng.normal(size=(7, 16))  # 2 labelled + 5 unlabelled
    x = np.concatenate([big, small])
    labels = np.full(24, -1)
    labels[[0, 1]] = 0
    labels[[17, 18]] = 1
    res = graph_label_propagation(x, labels, k=4)
    unl = np.flatnonzero(labels == -1)
    assert np.bincount(res.pseudo[unl]).tolist() == [15, 5]
    # ζ_j = |U| / (n_classes · |U_j|): 20 / (2·15) and 20 / (2·5)
    np.testing.assert_allclose(res.class_weights, [2 / 3, 2.0])
    assert res.class_weights[1] > res.class_weights[0]

    t_soft, w = pseudo_labels_for(res, unl)
    t_hard, w_hard = pseudo_labels_for(res, unl, soft=False)
    assert t_soft.dtype == w.dtype == t_hard.dtype == np.float32 and t_soft.shape == (20,)
    np.testing.assert_allclose(t_soft, res.probs[unl, 1], rtol=1e-6)
    np.testing.assert_array_equal(t_hard, [0.0] * 15 + [1.0] * 5)
    expected_w = res.certainty[unl] * np.where(res.pseudo[unl] == 1, 2.0, 2 / 3)
    np.testing.assert_allclose(w, expected_w, rtol=1e-6)
    np.testing.assert_array_equal(w, w_hard)
    mask = labels == -1
    np.testing.assert_array_equal(pseudo_labels_for(res, mask)[1], w)


def test_inverse_frequency_weights_formula():
    np.testing.assert_allclose(inverse_frequency_weights(np.array([0, 0, 0, 1]), 2), [2 / 3, 2])
    np.testing.assert_allclose(inverse_frequency_weights(np.array([0, 1, 1, 0]), 2), [1, 1])
    np.testing.assert_allclose(inverse_frequency_weights(np.array([0, 0, 2]), 3), [0.5, 0, 1])
    np.testing.assert_allclose(inverse_frequency_weights(np.array([], dtype=int), 2), [1, 1])


def test_scale_invariance():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 8)) + 0.3
    labels = np.full(40, -1)
    labels[[0, 3, 7]] = 0
    labels[[1, 5, 9]] = 1
    ref = graph_label_propagation(x, labels, k=6)
    for scale in (1e-3, 37.5):
        res = graph_label_propagation(scale * x, labels, k=6)
        np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res.certainty, ref.certainty, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(res.pseudo, ref.pseudo)
        np.testing.assert_allclose(res.class_weights, ref.class_weights)
    # float32 input gives the same graph
    res32 = graph_label_propagation(x.astype(np.float32), labels, k=6)
    np.testing.assert_array_equal(res32.pseudo, ref.pseudo)


def test_labelled_seeds_keep_their_class():
    rng = np.random.default_rng(7)
    x, _, _ = _two_clusters(rng, 12, extra=False)
    labels = np.full(24, -1)
    labels[:4] = 0
    labels[12] = 1  # imbalanced seeds: Y is normalised per class (1/|L_j|)
    res = graph_label_propagation(x, labels, k=5)
    assert (res.scores.sum(0) > 0).all()
    np.testing.assert_array_equal(res.pseudo, [0] * 12 + [1] * 12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"k": 10}, "k=10"),
        ({"k": 12}, "k=12"),
        ({"k": 0}, "k must"),
        ({"gamma": 0.0}, "gamma"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"n_classes": 1}, "n_classes"),
        ({"n_classes": 3}, r"class\(es\) \[2\]"),
    ],
)
def test_bad_parameters(kwargs, match):
    x = np.random.default_rng(8).normal(size=(10, 3))
    labels = np.array([0, 1, -1, -1, -1, -1, -1, -1, -1, -1])
    with pytest.raises(LymphdxError, match=match):
        graph_label_propagation(x, labels, **{"k": 3, **kwargs})


def test_bad_inputs():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(10, 3))
    labels = np.array([0, 1, -1, -1, -1, -1, -1, -1, -1, -1])
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    with pytest.raises(LymphdxError, match=r"NaN.*\[3\]"):
        graph_label_propagation(x_nan, labels)
    with pytest.raises(LymphdxError, match="2-D"):
        graph_label_propagation(x[:, 0], labels)
    with pytest.raises(LymphdxError, match="no labelled point of class"):
        graph_label_propagation(x, np.array([0, 0] + [-1] * 8), k=3)
    with pytest.raises(LymphdxError, match="no labelled point of class"):
        graph_label_propagation(x, np.full(10, -1), k=3)
    with pytest.raises(LymphdxError, match="shape"):
        graph_label_propagation(x, labels[:5], k=3)
    with pytest.raises(LymphdxError, match="-1 .unlabelled. or 0..1"):
        graph_label_propagation(x, np.array([0, 1, 2] + [-1] * 7), k=3)
    with pytest.raises(LymphdxError, match="whole numbers"):
        graph_label_propagation(x, np.array([0, 1, 0.5] + [-1] * 7), k=3)

    res3 = graph_label_propagation(x, np.array([0, 1, 2] + [-1] * 7), n_classes=3, k=3)
    with pytest.raises(LymphdxError, match="binary"):
        pseudo_labels_for(res3, np.arange(3, 10))
    res = graph_label_propagation(x, labels, k=3)
    with pytest.raises(LymphdxError, match="indices must lie"):
        pseudo_labels_for(res, np.array([2, 10]))
    with pytest.raises(LymphdxError, match="boolean mask"):
        pseudo_labels_for(res, np.ones(4, dtype=bool))
    t, w = pseudo_labels_for(res, np.array([], dtype=np.int64))
    assert t.shape == w.shape == (0,)
