"""``compare``: train and evaluate every strategy × seed, then Table I with intervals.

Statistics over seeds on one fixed test split:
* ``test_auc``: one AUC per seed; ``test_auc_mean`` ± ``test_auc_sd`` over seeds.
* ``test_auc_ci95``: stratified patient bootstrap of the seed-mean AUC (every resample
  scores all seeds on the same resampled patients), so it reflects the few test patients,
  which dominate the uncertainty, not only seed noise.
* ``paired_tests``: each strategy against ``supervised`` and ``ssmdmt`` against each other:
  ΔAUC (seed means), its paired bootstrap CI, and DeLong's paired test on the seed-averaged
  scores (plus the per-seed DeLong p-values).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.config import STRATEGIES, Config, validate
from lymphdx.errors import LymphdxError
from lymphdx.evaluation.evaluate import evaluate_run, read_predictions
from lymphdx.evaluation.metrics import _fast_auc_rows, _stratified_resamples, auc, delong_paired
from lymphdx.fileutil import atomic_path, write_json, write_text
from lymphdx.training.trainer import train

__all__ = ["compare", "summarise", "format_table", "PAPER_AUC"]

PAPER_AUC = {"supervised": 0.81, "semi-supervised": 0.84, "multitask": 0.82, "ssmdmt": 0.86}
LABELS = {
    "supervised": "Supervised Baseline",
    "semi-supervised": "Semi-Supervised",
    "multitask": "Supervised Multi-domain Multi-Task",
    "ssmdmt": "Semi-Supervised Multi-domain Multi-Task",
}


def _run_one(
    config: Config, run_dir: Path, weak_csv: Path, strong_csv: Path, progress: bool
) -> None:
    if (run_dir / "metrics.json").exists():
        return  # finished earlier: compare is resumable
    resume = (run_dir / "config.yaml").exists()
    train(config, run_dir, weak_csv, strong_csv, resume=resume, progress=progress)
    evaluate_run(run_dir, "test")


def _seed_mean_ci(
    y: np.ndarray, scores: np.ndarray, n: int, ci: float, seed: int
) -> tuple[float, float]:
    """CI of the seed-mean AUC; ``scores`` ``(S, N)`` for S seeds on N patients."""
    idx = _stratified_resamples(y, n, seed)
    means = np.mean([_fast_auc_rows(y[idx], s[idx]) for s in scores], axis=0)
    lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def _paired(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, ci: float, seed: int
) -> dict[str, Any]:
    """``a``, ``b`` ``(S, N)`` scores of two strategies over the same seeds and patients."""
    idx = _stratified_resamples(y, n, seed)
    delta = np.mean(
        [
            _fast_auc_rows(y[idx], sa[idx]) - _fast_auc_rows(y[idx], sb[idx])
            for sa, sb in zip(a, b, strict=True)
        ],
        axis=0,
    )
    lo, hi = np.quantile(delta, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    pooled = delong_paired(y, a.mean(axis=0), b.mean(axis=0))
    per_seed = [delong_paired(y, sa, sb).p for sa, sb in zip(a, b, strict=True)]
    return {
        "delta_auc": float(np.mean([auc(y, sa) - auc(y, sb) for sa, sb in zip(a, b, strict=True)])),
        "delta_ci95": [float(lo), float(hi)],
        "p_delong": pooled.p,
        "p_delong_per_seed": per_seed,
        "delta_auc_seed_averaged_scores": pooled.delta,
    }


def summarise(
    predictions: dict[str, dict[int, dict[str, tuple[int, float]]]],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Results from ``strategy -> seed -> patient -> (label, probability)``."""
    strategies = list(predictions)
    seeds = sorted(next(iter(predictions.values())))
    patients = sorted(next(iter(predictions[strategies[0]].values())))
    y = np.array([predictions[strategies[0]][seeds[0]][p][0] for p in patients])
    scores = {
        s: np.array([[predictions[s][k][p][1] for p in patients] for k in seeds])
        for s in strategies
    }
    out: dict[str, Any] = {
        "seeds": seeds,
        "n_test": len(y),
        "n_test_pos": int(y.sum()),
        "strategies": {},
        "paired_tests": {},
    }
    for s in strategies:
        aucs = [auc(y, row) for row in scores[s]]
        out["strategies"][s] = {
            "test_auc": aucs,
            "test_auc_mean": float(np.mean(aucs)),
            "test_auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
            "test_auc_ci95": list(_seed_mean_ci(y, scores[s], n_boot, ci, seed)),
            "paper_auc": PAPER_AUC.get(s),
        }
    pairs = [
        (s, "supervised") for s in strategies if s != "supervised" and "supervised" in strategies
    ]
    pairs += [
        ("ssmdmt", s)
        for s in strategies
        if s not in ("ssmdmt", "supervised") and "ssmdmt" in strategies
    ]
    for a, b in pairs:
        out["paired_tests"][f"{a} vs {b}"] = _paired(y, scores[a], scores[b], n_boot, ci, seed)
    return out


def format_table(results: dict[str, Any]) -> str:
    """Markdown laid out like the paper's Table I, with intervals and paired tests."""
    seeds = results["seeds"]
    lines = [
        f"Classification AUC on the weak set's test split (n = {results['n_test']}, "
        f"{results['n_test_pos']} positive), {len(seeds)} seed(s) {seeds}.",
        "",
        "| Training method for the classifier | Data sets | AUC mean ± sd | 95% CI | "
        "ΔAUC vs supervised [95% CI] | p (DeLong) | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, r in results["strategies"].items():
        data = "weak" if s == "supervised" else "weak + strong"
        test = results["paired_tests"].get(f"{s} vs supervised")
        delta = (
            f"{test['delta_auc']:+.3f} [{test['delta_ci95'][0]:+.3f}, {test['delta_ci95'][1]:+.3f}]"
            if test
            else "—"
        )
        p = f"{test['p_delong']:.3f}" if test else "—"
        paper = f"{r['paper_auc']:.2f}" if r.get("paper_auc") is not None else ""
        lines.append(
            f"| {LABELS.get(s, s)} | {data} | {r['test_auc_mean']:.3f} ± {r['test_auc_sd']:.3f} "
            f"| [{r['test_auc_ci95'][0]:.3f}, {r['test_auc_ci95'][1]:.3f}] | {delta} | {p} "
            f"| {paper} |"
        )
    others = {k: v for k, v in results["paired_tests"].items() if not k.endswith("vs supervised")}
    if others:
        lines += ["", "| Paired test | ΔAUC [95% CI] | p (DeLong) |", "|---|---|---|"]
        for name, t in others.items():
            lines.append(
                f"| {name} | {t['delta_auc']:+.3f} [{t['delta_ci95'][0]:+.3f}, "
                f"{t['delta_ci95'][1]:+.3f}] | {t['p_delong']:.3f} |"
            )
    widths = [r["test_auc_ci95"][1] - r["test_auc_ci95"][0] for r in results["strategies"].values()]
    lines += [
        "",
        f"The 95% intervals are {min(widths):.2f}–{max(widths):.2f} wide: with "
        f"{results['n_test']} test patients, AUC differences smaller than that are not "
        "distinguishable from chance; read ΔAUC by its interval and p, not by its sign.",
    ]
    return "\n".join(lines) + "\n"


def _roc_plot(path: Path, predictions: dict[str, dict[int, dict[str, tuple[int, float]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for s, by_seed in predictions.items():
        patients = sorted(next(iter(by_seed.values())))
        y = np.array([next(iter(by_seed.values()))[p][0] for p in patients])
        score = np.mean([[by_seed[k][p][1] for p in patients] for k in by_seed], axis=0)
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, label=f"{LABELS.get(s, s)} (AUC {auc(y, score):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC on the test split (scores averaged over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def compare(
    config: Config,
    weak_csv: str | Path,
    strong_csv: str | Path,
    out: str | Path,
    strategies: list[str] | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train + evaluate every strategy × seed into ``out/runs/<strategy>/seed<k>``; writes
    ``out/results.json``, ``out/results.md`` and ``out/roc.png``. Resumable: finished runs
    are kept, interrupted ones resumed."""
    out = Path(out)
    strategies = strategies or list(STRATEGIES)
    seeds = seeds if seeds is not None else [0]
    for s in strategies:
        if s not in STRATEGIES:
            raise LymphdxError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    predictions: dict[str, dict[int, dict[str, tuple[int, float]]]] = {}
    for strategy in strategies:
        for seed in seeds:
            data = config.model_dump(mode="json")
            data.update(strategy=strategy, seed=seed)
            run_dir = out / "runs" / strategy / f"seed{seed}"
            if progress:
                print(f"[compare] {strategy} seed {seed} -> {run_dir}", flush=True)
            _run_one(validate(data), run_dir, Path(weak_csv), Path(strong_csv), progress)
            predictions.setdefault(strategy, {})[seed] = read_predictions(
                run_dir / "predictions_test.csv"
            )
    results = summarise(predictions, config.evaluation.bootstrap, config.evaluation.ci, config.seed)
    results["config_preset"] = config.preset
    write_json(out / "results.json", results)
    table = format_table(results)
    write_text(out / "results.md", "# Table I on this data\n\n" + table)
    _roc_plot(out / "roc.png", predictions)
    with atomic_path(out / "test_predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "patient_id", "label", "probability"])
        for s, by_seed in predictions.items():
            for k, rows in by_seed.items():
                for pid, (lab, p) in sorted(rows.items()):
                    w.writerow([s, k, pid, lab, f"{p:.6f}"])
    return results
