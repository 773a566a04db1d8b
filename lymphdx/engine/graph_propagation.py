r"""Graph label propagation on embeddings (Iscen et al., CVPR 2019).

Reference: A. Iscen, G. Tolias, Y. Avrithis, O. Chum, "Label Propagation for Deep
Semi-supervised Learning", CVPR 2019 (§3.2, eqs. 9–11, and the authors' reference code
``ahmetius/LP-DeepSSL``).

Given ``N`` embeddings ``V`` ``(N, C)`` of which a subset ``L`` is labelled (``L_j`` the
labelled points of class ``j``) and the rest ``U`` is unlabelled (label ``-1``):

1. L2-normalise: ``v_i ← v_i / ‖v_i‖`` (an all-zero embedding stays zero and gets no edges).
2. k-NN affinities, self excluded::

       a_ij = max(0, v_iᵀ v_j)^γ   if j ∈ NN_k(i), j ≠ i,   else 0          A (N, N), sparse

   (each row of ``A`` has at most ``k`` non-zeros; neighbours are exact, by inner product).
3. Symmetrise ``W = A + Aᵀ`` and normalise ``W_n = D^{-1/2} W D^{-1/2}`` with
   ``D = diag(W 1)``; a node of zero degree gets ``D^{-1/2}_ii = 0`` (it stays isolated).
4. Seeds ``Y`` ``(N, n_classes)``: ``Y_ij = 1 / |L_j|`` if ``i ∈ L_j`` else ``0``. The
   column normalisation by class size is what the authors' code does (the paper writes
   ``Y_ij = 1``); it gives every class the same total seed mass, so a class with more
   labelled points does not dominate the diffusion.
5. Diffuse: solve ``(I − α W_n) Z = Y`` column by column with conjugate gradient
   (``scipy.sparse.linalg.cg``, ``maxiter=max_iter``, ``rtol=tol``). ``I − α W_n`` is
   symmetric positive definite for ``0 < α < 1`` (eigenvalues in ``[1−α, 1+α]``).
   ``Z = Σ_t α^t W_n^t Y ≥ 0`` in exact arithmetic; CG may leave tiny negatives.
6. Pseudo-labels and weights (paper eqs. 10–11)::

       ẑ_i    = max(Z_i, 0) / Σ_j max(Z_ij, 0)              probs    (N, n_classes)
       ŷ_i    = argmax_j ẑ_ij                                pseudo   (N,)
       ω_i    = 1 − H(ẑ_i) / log(n_classes)                  certainty (N,), in [0, 1]
       ζ_j    = |U| / (n_classes · |U_j|)                    class_weights (n_classes,)

   with ``H`` the entropy (natural log) and ``U_j = {i ∈ U : ŷ_i = j}``. ``ζ_j`` is the
   inverse class frequency of the pseudo-labels over the unlabelled points, normalised as
   in the authors' code (``(n / c) / |class j|``) so that balanced classes get ``ζ_j = 1``.
   (The authors' code counts the labelled points, with their true labels, as well; here
   only the unlabelled points are counted, since only they receive pseudo-labels.) A class
   that no unlabelled point is assigned to gets ``ζ_j = 0`` (it weights nothing); with no
   unlabelled points at all ``ζ = 1``. A row with ``Z_i ≤ 0`` everywhere (a point not
   connected to any seed) gets uniform ``probs``, ``certainty 0`` and ``pseudo 0``.
   The authors' code also divides ``ω`` by its maximum; that is *not* done here.

The values for labelled points are the diffused ones too (the caller uses the true labels
for those). Affinity search is sklearn's exact brute-force ``kneighbors_graph`` (in chunks
of its ``working_memory``: ``O(N² C)`` time), and everything else is sparse, so ``N ≈ 10⁵``
is feasible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import laplacian
from scipy.sparse.linalg import cg
from sklearn.neighbors import kneighbors_graph

from lymphdx.core.errors import LymphdxError

__all__ = [
    "GraphLPResult",
    "graph_label_propagation",
    "knn_affinity",
    "normalised_adjacency",
    "inverse_frequency_weights",
    "pseudo_labels_for",
]


@dataclass
class GraphLPResult:
    """Output of :func:`graph_label_propagation` (``N`` points, ``n_classes`` classes).

    ``scores`` ``(N, n_classes)`` diffused scores ``Z``; ``probs`` ``(N, n_classes)`` the
    row-normalised non-negative scores ``ẑ``; ``pseudo`` ``(N,)`` int64 ``argmax ẑ``;
    ``certainty`` ``(N,)`` ``ω = 1 − H(ẑ)/log(n_classes)``; ``class_weights``
    ``(n_classes,)`` ``ζ_j = |U| / (n_classes · |U_j|)``; ``iterations`` the most CG
    iterations any class needed; ``converged`` whether every class reached ``tol``.
    """

    scores: np.ndarray
    probs: np.ndarray
    pseudo: np.ndarray
    certainty: np.ndarray
    class_weights: np.ndarray
    iterations: int
    converged: bool = True


def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise LymphdxError(
            f"graph label propagation: embeddings must be 2-D (N, C), got shape {x.shape}"
        )
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise LymphdxError(
            f"graph label propagation: need at least 2 embeddings of dimension ≥ 1, "
            f"got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise LymphdxError(
            f"graph label propagation: embeddings must be real numbers, got dtype {x.dtype}"
        )
    x = x.astype(np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise LymphdxError(
            f"graph label propagation: {rows.size} embedding(s) contain NaN or inf "
            f"(first rows: {rows[:5].tolist()})"
        )
    return x


def _check_k_gamma(n: int, k: int, gamma: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise LymphdxError(f"graph label propagation: k must be an integer ≥ 1, got {k!r}")
    if k >= n:
        raise LymphdxError(
            f"graph label propagation: k={k} nearest neighbours needs more than k points, "
            f"but there are only N={n} (self is excluded); use k ≤ {n - 1}"
        )
    if not np.isfinite(gamma) or gamma <= 0:
        raise LymphdxError(f"graph label propagation: gamma must be > 0, got {gamma!r}")


def knn_affinity(embeddings: np.ndarray, k: int = 10, gamma: float = 3.0) -> sp.csr_matrix:
    """The (non-symmetric) k-NN affinity ``A`` ``(N, N)`` as a CSR matrix.

    ``a_ij = max(0, v_iᵀ v_j)^γ`` for the ``k`` nearest neighbours ``j ≠ i`` of ``i`` by
    inner product of the L2-normalised embeddings, else 0; zero entries are not stored, so
    each row has at most ``k`` non-zeros.
    """
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    _check_k_gamma(n, k, gamma)
    # cosine distance 1 − v_iᵀv_j ranks neighbours as the inner product of the normalised
    # embeddings does (a zero embedding is at distance 1 from all: no edge)
    A = kneighbors_graph(x, k, mode="distance", metric="cosine", include_self=False)
    A.data = np.maximum(1.0 - A.data, 0.0) ** gamma
    A.eliminate_zeros()
    return A.tocsr()


def normalised_adjacency(A: sp.spmatrix) -> sp.csr_matrix:
    """``W_n = D^{-1/2} (A + Aᵀ) D^{-1/2}`` with ``D = diag((A + Aᵀ) 1)``; zero-degree
    nodes get ``D^{-1/2}_ii = 0``. Returns a symmetric CSR matrix."""
    # csgraph's normalised Laplacian is I − W_n off the isolated nodes (and 0 on them);
    # W has no self-loops, so W_n's diagonal is 0
    Wn = -laplacian((A + A.T).tocsr(), normed=True)
    Wn.setdiag(0.0)
    Wn.eliminate_zeros()
    return Wn.tocsr()


def inverse_frequency_weights(pseudo: np.ndarray, n_classes: int) -> np.ndarray:
    """Class weights ``ζ_j = M / (n_classes · M_j)`` from the ``M`` pseudo-labels ``pseudo``
    of the unlabelled points (``M_j`` of them in class ``j``), as in Iscen et al.'s code:
    balanced classes give 1, a minority class more. ``ζ_j = 0`` where ``M_j = 0``;
    ``ζ = 1`` when ``M = 0``. Returns float64 ``(n_classes,)``.

    Not sklearn's ``compute_class_weight("balanced")``: it refuses a class absent from the
    pseudo-labels (here ζ_j = 0) and would normalise by the present classes only."""
    pseudo = np.asarray(pseudo, dtype=np.int64).ravel()
    m = pseudo.size
    if m == 0:
        return np.ones(n_classes, dtype=np.float64)
    counts = np.bincount(pseudo, minlength=n_classes).astype(np.float64)
    out = np.zeros(n_classes, dtype=np.float64)
    np.divide(m / n_classes, counts, out=out, where=counts > 0)
    return out


def _check_labels(labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise LymphdxError(
            f"graph label propagation: labels must have shape ({n},) to match the "
            f"embeddings, got {y.shape}"
        )
    if y.dtype == bool or not np.issubdtype(y.dtype, np.number):
        raise LymphdxError(
            f"graph label propagation: labels must be integers (-1 = unlabelled), "
            f"got dtype {y.dtype}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise LymphdxError(
                "graph label propagation: labels must be whole numbers (-1 = unlabelled)"
            )
    y = y.astype(np.int64)
    bad = (y < -1) | (y >= n_classes)
    if bad.any():
        raise LymphdxError(
            f"graph label propagation: labels must be -1 (unlabelled) or 0..{n_classes - 1}, "
            f"got {sorted(set(y[bad].tolist()))[:5]}"
        )
    counts = np.bincount(y[y >= 0], minlength=n_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise LymphdxError(
            f"graph label propagation: no labelled point of class(es) {missing.tolist()}; "
            f"every class needs at least one labelled seed (labelled per class: "
            f"{counts.tolist()})"
        )
    return y


def graph_label_propagation(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int = 2,
    k: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    max_iter: int = 20,
    tol: float = 1e-6,
) -> GraphLPResult:
    """Diffuse the labels of the labelled points over a k-NN graph of ``embeddings``.

    ``embeddings`` ``(N, C)`` real, finite; ``labels`` ``(N,)`` int, ``-1`` for unlabelled,
    else ``0..n_classes-1``, with every class labelled at least once. See the module
    docstring for the exact formulas. Raises :class:`LymphdxError` on invalid input.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise LymphdxError(f"graph label propagation: n_classes must be an int, got {n_classes!r}")
    if n_classes < 2:
        raise LymphdxError(f"graph label propagation: n_classes must be ≥ 2, got {n_classes}")
    if not (0.0 < alpha < 1.0):
        raise LymphdxError(
            f"graph label propagation: alpha must lie strictly between 0 and 1, got {alpha!r}"
        )
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise LymphdxError(
            f"graph label propagation: max_iter must be an integer ≥ 1, got {max_iter!r}"
        )
    if not np.isfinite(tol) or tol <= 0:
        raise LymphdxError(f"graph label propagation: tol must be > 0, got {tol!r}")
    x = _check_embeddings(embeddings)
    n = x.shape[0]
    _check_k_gamma(n, k, gamma)
    y = _check_labels(labels, n, n_classes)

    Wn = normalised_adjacency(knn_affinity(x, k=k, gamma=gamma))
    system = (sp.identity(n, format="csr") - alpha * Wn).tocsr()

    Y = np.zeros((n, n_classes), dtype=np.float64)
    labelled = np.flatnonzero(y >= 0)
    counts = np.bincount(y[labelled], minlength=n_classes)
    Y[labelled, y[labelled]] = 1.0 / counts[y[labelled]]

    Z = np.zeros_like(Y)
    iterations = 0
    converged = True
    for j in range(n_classes):
        count = [0]

        def _count(_xk: np.ndarray, count: list[int] = count) -> None:
            count[0] += 1

        z, info = cg(system, Y[:, j], rtol=tol, atol=0.0, maxiter=max_iter, callback=_count)
        if info < 0:  # pragma: no cover - illegal input/breakdown; SPD system by design
            raise LymphdxError(f"graph label propagation: conjugate gradient failed ({info})")
        converged &= info == 0
        iterations = max(iterations, count[0])
        Z[:, j] = z

    pos = np.maximum(Z, 0.0)
    total = pos.sum(axis=1, keepdims=True)
    probs = np.full_like(pos, 1.0 / n_classes)
    np.divide(pos, total, out=probs, where=total > 0)
    pseudo = probs.argmax(axis=1).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
    entropy = -plogp.sum(axis=1)
    certainty = np.clip(1.0 - entropy / np.log(n_classes), 0.0, 1.0)
    certainty[total[:, 0] <= 0] = 0.0
    class_weights = inverse_frequency_weights(pseudo[y < 0], n_classes)
    return GraphLPResult(
        scores=Z,
        probs=probs,
        pseudo=pseudo,
        certainty=certainty,
        class_weights=class_weights,
        iterations=int(iterations),
        converged=bool(converged),
    )


def pseudo_labels_for(
    result: GraphLPResult, unlabelled_index: np.ndarray, soft: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Binary pseudo-label targets and weights for the points ``unlabelled_index``.

    ``unlabelled_index``: ``(M,)`` integer indices into the ``N`` points, or an ``(N,)``
    boolean mask. Returns float32 ``(M,)`` ``targets`` — ``probs[:, 1]`` if ``soft`` else the
    hard ``pseudo`` label — and float32 ``(M,)`` ``weights = ω_i · ζ_{ŷ_i}`` (Iscen et al.
    eq. 12), for the weighted pseudo-label BCE of the strong set.
    """
    n_points, n_classes = result.probs.shape
    if n_classes != 2:
        raise LymphdxError(
            f"pseudo_labels_for is for the binary case (2 classes), got {n_classes} classes"
        )
    idx = np.asarray(unlabelled_index)
    if idx.dtype == bool:
        if idx.shape != (n_points,):
            raise LymphdxError(
                f"pseudo_labels_for: a boolean mask must have shape ({n_points},), got {idx.shape}"
            )
        idx = np.flatnonzero(idx)
    elif idx.size == 0:
        idx = idx.astype(np.int64).ravel()
    elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
        raise LymphdxError(
            f"pseudo_labels_for: unlabelled_index must be 1-D integer indices or a boolean "
            f"mask, got dtype {idx.dtype} shape {idx.shape}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_points):
        raise LymphdxError(
            f"pseudo_labels_for: indices must lie in [0, {n_points}), got "
            f"{int(idx.min())}..{int(idx.max())}"
        )
    pseudo = result.pseudo[idx]
    targets = result.probs[idx, 1] if soft else pseudo
    weights = result.certainty[idx] * result.class_weights[pseudo]
    return targets.astype(np.float32), weights.astype(np.float32)
