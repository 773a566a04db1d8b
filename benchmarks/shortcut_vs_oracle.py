"""Does the synthetic weak task need localisation? Shortcut vs oracle on the weak set.

Generates the weak set ("hospital A") in memory, exactly as ``lymphdx synth`` writes it
(same per-patient generators and label order), and compares, with stratified 5-fold CV
repeated 5 times (AUC over the 25 test folds, mean ± sd):

(a) shortcut: standardised logistic regression on the whole-volume intensity histogram
    (64 bins over [-250, 350] HU, density): what a model gets without finding the nodes;
(b) oracle: the same model on the true node features (max diameter, max roundness, any
    necrotic, any heterogeneous, number of nodes): what perfect localisation allows;
(c) the oracle's single best feature alone (same CV), and every feature's raw AUC.

Prints one JSON object to stdout. The phantom is designed so that (a) stays near chance
(see the docstring of ``lymphdx.data.synthetic``); if (a) approaches (b), the data set
could be solved without localising nodes and the strategy comparison would be moot.

Usage: ``python benchmarks/shortcut_vs_oracle.py [--n-weak 123] [--n-pos 57] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lymphdx.data.synthetic import SynthSpec, make_scan, patient_rng, weak_labels  # noqa: E402

BINS = np.linspace(-250.0, 350.0, 65)
ORACLE_FEATURES = (
    "max_diameter",
    "max_roundness",
    "any_necrotic",
    "any_heterogeneous",
    "n_nodes",
)


def weak_features(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram features ``(n, 64)``, oracle features ``(n, 5)`` and labels ``(n,)``."""
    labels = weak_labels(spec)
    hist, oracle = [], []
    for i in range(spec.n_weak):
        scan = make_scan(patient_rng(spec.seed, "weak", i), "A", bool(labels[i]))
        assert scan.metastatic == bool(labels[i])
        h, _ = np.histogram(scan.hu, bins=BINS, density=True)
        hist.append(h)
        nodes = scan.nodes
        oracle.append(
            [
                max(n.diameter_mm for n in nodes),
                max(n.roundness for n in nodes),
                float(any(n.necrotic for n in nodes)),
                float(any(n.heterogeneous for n in nodes)),
                float(len(nodes)),
            ]
        )
    return np.asarray(hist), np.asarray(oracle), labels


def cv_auc(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """Stratified 5-fold CV × 5 repeats of standardised logistic regression."""
    cv = RepeatedStratifiedKFold(n_splits=5, n_repeats=5, random_state=seed)
    aucs = []
    for train, test in cv.split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(x[train], y[train])
        aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    a = np.asarray(aucs)
    return {"auc_mean": round(float(a.mean()), 3), "auc_sd": round(float(a.std(ddof=1)), 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-weak", type=int, default=123)
    p.add_argument("--n-pos", type=int, default=None, help="default: 57/123 of --n-weak")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n_pos = args.n_pos if args.n_pos is not None else round(args.n_weak * 57 / 123)
    spec = SynthSpec(n_weak=args.n_weak, n_pos=n_pos, n_strong=0, seed=args.seed)

    t0 = time.perf_counter()
    hist, oracle, y = weak_features(spec)
    t_gen = time.perf_counter() - t0

    single = {name: cv_auc(oracle[:, [j]], y, args.seed) for j, name in enumerate(ORACLE_FEATURES)}
    best = max(single, key=lambda k: single[k]["auc_mean"])
    raw = {
        name: round(float(roc_auc_score(y, oracle[:, j])), 3)
        for j, name in enumerate(ORACLE_FEATURES)
    }
    result = {
        "n_weak": spec.n_weak,
        "n_pos": spec.n_pos,
        "seed": spec.seed,
        "cv": "stratified 5-fold x 5 repeats, AUC over 25 test folds",
        "shortcut_histogram": cv_auc(hist, y, args.seed),
        "oracle_node_features": cv_auc(oracle, y, args.seed),
        "oracle_best_single_feature": {"feature": best, **single[best]},
        "oracle_single_features": single,
        "oracle_raw_feature_auc": raw,
        "generate_seconds": round(t_gen, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
