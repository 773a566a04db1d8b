"""Why does a run's strong-validation Dice differ from its strong-test Dice? (issue 29 item 6)

For one finished run folder, scores the ROI map at ζ (``propagation.roi_threshold``) on
the strong set's splits, one factor at a time:

- ``history``: the last ``strong_val_dice`` of ``history.csv`` (what the gates read);
- ``trainer``: ``roi_status.strong_dice``, what the trainer calls (no flip, batches of 4,
  pooled);
- ``noflip`` / ``flip``: ``detection._roi_probabilities`` without / with the left-right
  flip, pooled over the split by ``detection._score_split`` (``flip`` on the test split
  is ``detection.json``'s strong-test Dice); ``flip`` thresholds the *averaged* map;
- ``batch1``: no flip, one scan per forward pass (batch composition);
- ``mean/vol``: the mean of the per-scan Dice (no flip);
- models: ``best.pt`` (the selected weights: the EMA under ``ema_last``), the student and
  the EMA state of ``last.pt``;
then per validation patient (nodes, node voxels, predicted voxels, Dice) and, for the
best model without the flip, a bootstrap over patients of the pooled Dice of val (the
gates' figure), test, and train + val (a larger figure a gate could read).

With ``--epochs`` (a run trained with ``training.keep_epochs``): every epoch's validated
weights (``checkpoints/epoch_XXX.pt``) scored again, val by ``strong_dice`` beside
``history.csv``'s value, and val and test with the flip.

Usage: python benchmarks/val_dice_probe.py RUN_DIR [--boot 2000] [--epochs] [--json OUT.json]
(set LYMPHDX_CACHE to the run's cache). Prints tables; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lymphdx.core.domains import STRONG  # noqa: E402
from lymphdx.core.zeta import roi_mask  # noqa: E402
from lymphdx.data.datasets import VolumeSet  # noqa: E402
from lymphdx.engine.distributed import DistContext  # noqa: E402
from lymphdx.engine.roi_status import strong_dice  # noqa: E402
from lymphdx.engine.run_data import load_run_data  # noqa: E402
from lymphdx.engine.run_folder import load_model, read_checkpoint, read_history  # noqa: E402
from lymphdx.models.multitask import MultiTaskNet, build_model  # noqa: E402
from lymphdx.stats.metrics import dice_counts, dice_of  # noqa: E402
from lymphdx.workflows.detection import _roi_probabilities, _score_split, instances  # noqa: E402


def _models(run_dir: Path) -> dict[str, MultiTaskNet]:
    """``best`` (what evaluate scores), ``student`` and ``ema`` of ``last.pt``."""
    config, best, _ = load_model(run_dir, "best")
    out = {"best": best}
    state, _ = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    for name, weights in (
        ("student", state["model"]),
        ("ema", (state.get("ema") or {}).get("model")),
    ):
        if weights is None:
            continue
        m = build_model(config.model)
        m.load_state_dict(weights)
        out[name] = m.eval()
    return out


def _counts(probs: list[np.ndarray], truths: list[np.ndarray], zeta: float) -> np.ndarray:
    """``(n, 2)`` per-scan ``(|P ∩ T|, |P| + |T|)``."""
    return np.array([dice_counts(roi_mask(p, zeta), t) for p, t in zip(probs, truths, strict=True)])


def _node_hits(probs: list[np.ndarray], truths: list[np.ndarray], zeta: float) -> np.ndarray:
    """``(n, 2)`` per-scan ``(nodes with a voxel above ζ, nodes)``: node-level recall."""
    out = []
    for p, t in zip(probs, truths, strict=True):
        inst = instances(t)
        hit = np.unique(inst[roi_mask(p, zeta) & (inst > 0)])
        out.append((len(hit), int(inst.max())))
    return np.array(out)


def _bootstrap(counts: np.ndarray, n_boot: int, factor: float = 2.0) -> dict[str, float]:
    """``factor · Σ counts[:, 0] / Σ counts[:, 1]`` (pooled Dice with 2, a rate with 1) of
    ``counts`` ``(n, 2)`` resampled over patients (seeded): sd and 5–95 %."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    num, den = counts[idx, 0].sum(1), counts[idx, 1].sum(1)
    d = np.where(den > 0, factor * num / np.maximum(den, 1), 1.0)
    n, m = counts.sum(0)
    return {
        "n": len(counts),
        "value": float(factor * n / m) if m else 1.0,
        "sd": float(d.std()),
        "p05": float(np.quantile(d, 0.05)),
        "p95": float(np.quantile(d, 0.95)),
    }


def _subsets(counts: np.ndarray, split: np.ndarray, n_draws: int) -> dict[str, float]:
    """Pooled Dice of ``n_draws`` random subsets (without replacement) of ``counts``
    ``(n, 2)`` as large as ``split`` ``(k, 2)``: how far one split of that size can fall
    from the whole set, and the share of subsets at or below the split's own Dice."""
    size = len(split)
    own = dice_of(*split.sum(0))
    rng = np.random.default_rng(1)
    idx = np.array([rng.choice(len(counts), size, replace=False) for _ in range(n_draws)])
    inter, total = counts[idx, 0].sum(1), counts[idx, 1].sum(1)
    d = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    whole = dice_of(*counts.sum(0))
    return {
        "size": size,
        "all_patients": whole,
        "p05": float(np.quantile(d, 0.05)),
        "p50": float(np.quantile(d, 0.5)),
        "p95": float(np.quantile(d, 0.95)),
        "share_below_whole/3": float(np.mean(d <= whole / 3)),
        "share_below_whole/6": float(np.mean(d <= whole / 6)),
        "split": own,
        "share_at_or_below_split": float(np.mean(d <= own)),
    }


def probe(run_dir: Path, n_boot: int) -> dict[str, Any]:
    config, _, _ = load_model(run_dir, "best")
    zeta = float(config.propagation.roi_threshold)
    data = load_run_data(config, run_dir)
    models = _models(run_dir)
    history = [r for r in read_history(run_dir / "history.csv") if r.get("strong_val_dice")]
    sets: dict[str, VolumeSet] = {
        s: data.volumes("strong", s, masks=True) for s in ("train", "val", "test")
    }
    truths = {s: [v.mask(i) for i in range(len(v))] for s, v in sets.items()}
    rows: dict[str, dict[str, Any]] = {}
    per_patient: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, np.ndarray] = {}
    for name, model in models.items():
        for split in ("val", "test", "train"):
            vols, idx = sets[split], list(range(len(sets[split])))
            if split == "train" and name != "best":
                continue
            plain = _roi_probabilities(model, vols, idx, STRONG, tta=False)
            flip = _roi_probabilities(model, vols, idx, STRONG, tta=True)
            row = {
                "n": len(idx),
                "trainer": strong_dice(model, [vols], zeta, DistContext()),
                "noflip": _score_split(plain, truths[split], 0.1, zeta)["dice"],
                "flip": _score_split(flip, truths[split], 0.1, zeta)["dice"],
                "batch1": dice_of(
                    *_counts(
                        [_roi_probabilities(model, vols, [i], STRONG)[0] for i in idx],
                        truths[split],
                        zeta,
                    ).sum(0)
                ),
                "mean/vol": float(
                    np.mean([dice_of(*c) for c in _counts(plain, truths[split], zeta)])
                ),
            }
            rows[f"{name}:{split}"] = row
            if name == "best":
                counts[split] = _counts(plain, truths[split], zeta)
                counts[split + "_flip"] = _counts(flip, truths[split], zeta)
                counts[split + "_nodes"] = _node_hits(plain, truths[split], zeta)
            if name == "best" and split == "val":
                per_patient[split] = []
                for i, (p, f, t) in enumerate(zip(plain, flip, truths[split], strict=True)):
                    inter, total = dice_counts(roi_mask(p, zeta), t)
                    inter_f, total_f = dice_counts(roi_mask(f, zeta), t)
                    per_patient[split].append(
                        {
                            "patient": vols.records[i].patient_id,
                            "nodes": int(instances(t).max()),
                            "node_vox": int((t > 0).sum()),
                            "pred_vox": int(roi_mask(p, zeta).sum()),
                            "inter": inter,
                            "dice": dice_of(inter, total),
                            "pred_vox_flip": int(roi_mask(f, zeta).sum()),
                            "dice_flip": dice_of(inter_f, total_f),
                            "max_prob": float(p.max()),
                        }
                    )

    def both(key: str) -> np.ndarray:
        return np.concatenate([counts[f"train{key}"], counts[f"val{key}"]])

    boot = {
        "dice val": _bootstrap(counts["val"], n_boot),
        "dice test": _bootstrap(counts["test"], n_boot),
        "dice train+val": _bootstrap(both(""), n_boot),
        "dice val flip": _bootstrap(counts["val_flip"], n_boot),
        "dice test flip": _bootstrap(counts["test_flip"], n_boot),
        "nodes val": _bootstrap(counts["val_nodes"], n_boot, 1.0),
        "nodes test": _bootstrap(counts["test_nodes"], n_boot, 1.0),
        "nodes train+val": _bootstrap(both("_nodes"), n_boot, 1.0),
    }
    every = np.concatenate([counts["train"], counts["val"], counts["test"]])
    subsets = {s: _subsets(every, counts[s], n_boot) for s in ("val", "test")}
    return {
        "run": str(run_dir),
        "subsets": subsets,
        "zeta": zeta,
        "history_last": float(history[-1]["strong_val_dice"]) if history else None,
        "history_epoch": int(history[-1]["epoch"]) if history else None,
        "rows": rows,
        "val_patients": per_patient.get("val", []),
        "bootstrap": boot,
    }


def per_epoch(run_dir: Path) -> list[dict[str, Any]]:
    """Each kept epoch: history's ``strong_val_dice``, ``strong_dice`` of its checkpoint
    on val, and val / test pooled Dice with the flip."""
    config, _, _ = load_model(run_dir, "best")
    zeta = float(config.propagation.roi_threshold)
    data = load_run_data(config, run_dir)
    val = data.volumes("strong", "val", masks=True)
    test = data.volumes("strong", "test", masks=True)
    truths = {
        "val": [val.mask(i) for i in range(len(val))],
        "test": [test.mask(i) for i in range(len(test))],
    }
    history = {int(r["epoch"]): r for r in read_history(run_dir / "history.csv")}
    out = []
    for epoch in sorted(history):
        path = run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"
        if not path.exists() or history[epoch].get("strong_val_dice") in (None, ""):
            continue
        state, _ = read_checkpoint(path)
        model = build_model(config.model)
        model.load_state_dict(state["model"])
        model.eval()
        row: dict[str, Any] = {
            "epoch": epoch,
            "history": float(history[epoch]["strong_val_dice"]),
            "trainer": strong_dice(model, [val], zeta, DistContext()),
        }
        for split, vols in (("val", val), ("test", test)):
            idx = list(range(len(vols)))
            for tta in (False, True):
                probs = _roi_probabilities(model, vols, idx, STRONG, tta=tta)
                key = f"{split}_{'flip' if tta else 'noflip'}"
                row[key] = dice_of(*_counts(probs, truths[split], zeta).sum(0))
        out.append(row)
    return out


def _print(report: dict[str, Any]) -> None:
    print(f"run {report['run']}  ζ = {report['zeta']}")
    print(
        f"history.csv last strong_val_dice (epoch {report['history_epoch']}): "
        f"{report['history_last']:.4f}"
    )
    keys = ["n", "trainer", "noflip", "flip", "batch1", "mean/vol"]
    print(f"{'model:split':<16}" + "".join(f"{k:>10}" for k in keys))
    for name, row in report["rows"].items():
        cells = [f"{row[k]:>10d}" if k == "n" else f"{row[k]:>10.4f}" for k in keys]
        print(f"{name:<16}" + "".join(cells))
    print("\nvalidation patients (best model; no flip / flip):")
    keys = ["patient", "nodes", "node_vox", "pred_vox", "inter", "dice", "pred_vox_flip"]
    keys += ["dice_flip", "max_prob"]
    print("".join(f"{k:>14}" for k in keys))
    for p in report["val_patients"]:
        print("".join(f"{p[k]:>14.4f}" if isinstance(p[k], float) else f"{p[k]:>14}" for k in keys))
    print(
        "\nbootstrap over patients (best model, no flip unless said): pooled Dice, and "
        "'nodes' = share of nodes with a voxel above ζ"
    )
    for name, b in report["bootstrap"].items():
        print(
            f"{name:<16} n={b['n']:>3}  {b['value']:.4f}  sd {b['sd']:.4f}  "
            f"5-95% [{b['p05']:.4f}, {b['p95']:.4f}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--epochs", action="store_true", help="also every kept epoch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    report = probe(args.run, args.boot)
    if args.epochs:
        report["epochs"] = per_epoch(args.run)
    report["seconds"] = round(time.perf_counter() - start, 1)
    _print(report)
    print("\nrandom subsets of all strong patients (best model, no flip): pooled Dice")
    for name, sub in report["subsets"].items():
        print(
            f"{sub['size']:>3} patients: all {sub['all_patients']:.4f}  5/50/95% "
            f"{sub['p05']:.4f} {sub['p50']:.4f} {sub['p95']:.4f}  P(<= all/3) "
            f"{sub['share_below_whole/3']:.4f}  P(<= all/6) {sub['share_below_whole/6']:.4f}"
            f"  {name} {sub['split']:.4f}: P(<= {name}) {sub['share_at_or_below_split']:.4f}"
        )
    if "epochs" in report:
        keys = ["epoch", "history", "trainer", "val_noflip", "val_flip", "test_noflip"]
        keys += ["test_flip"]
        print("\nper epoch (validated weights, checkpoints/epoch_XXX.pt):")
        print("".join(f"{k:>12}" for k in keys))
        for r in report["epochs"]:
            print("".join(f"{r[k]:>12d}" if k == "epoch" else f"{r[k]:>12.4f}" for k in keys))
    print(f"\n{report['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
