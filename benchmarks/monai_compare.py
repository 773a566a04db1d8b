"""lymphdx ``ssmdmt`` (quick preset) against MONAI's 3-D DenseNet121 on the same weak set.

Command (from the repository root; ~8 min on the idle 2-core VM at 16 epochs):

    .venv/bin/python benchmarks/monai_compare.py                 # 123 weak + 85 strong, 16 epochs
    .venv/bin/python benchmarks/monai_compare.py --data DIR      # reuse (or write) data in DIR
    .venv/bin/python benchmarks/monai_compare.py --epochs 4      # shorter
    .venv/bin/python benchmarks/monai_compare.py --quick         # smoke: 24 + 16 scans, 2 epochs

What it measures, both models in one run of the script, each in its own subprocess (so
each peak RSS is its own):
(a) lymphdx: ``lymphdx.engine.train.train`` with the ``quick`` preset, strategy
    ``ssmdmt`` (its default 16 epochs unless ``--epochs``), then
    ``lymphdx.workflows.evaluate.evaluate_run`` (test AUC of the model chosen on
    validation AUC, 95 % stratified bootstrap CI);
(b) ``monai.networks.nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)``
    trained as a scan classifier, on the device run (a) used (``--device``: lymphdx's
    ``training.device``, auto = CUDA when present), on the same weak set with the run's own splits,
    preprocessing cache and weak-domain normaliser (``load_run_data`` on run (a)'s folder,
    so ``splits.csv`` and ``normalization.json`` are identical), the same batches
    (``epoch_order``, seed, a last batch of 1 merged), the same flip augmentation draws,
    the same loss (BCE on the logit), Adam with the preset's lr and weight decay, the same
    number of epochs, model selection on validation AUC (ties: lower validation BCE), and
    test AUC once with the same bootstrap (``bootstrap_auc_ci``, the preset's
    ``evaluation.bootstrap`` resamples and seed).
Reported per model: parameters, seconds per epoch (the training loop's own, i.e. training +
validation, and training alone), peak RSS and peak minus RSS after imports, best epoch and
its validation AUC, test AUC with 95 % CI. Between them: DeLong's paired test on the test
patients (``delong_paired``, a = lymphdx, b = MONAI) and the paired bootstrap CI of the
difference (``paired_bootstrap_delta_ci``).

Note: lymphdx ssmdmt also trains on the strong set (ROI masks and propagated labels), so it
sees more data per epoch than the classifier; the comparison is of the tools as a user runs
them, not of the encoders alone. Prints one JSON object to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (  # noqa: E402
    emit,
    ensure_synthetic,
    log,
    machine,
    mib,
    peak_rss_kib,
    rss_kib,
    run_child,
)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _cuda_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


# ----------------------------------------------------------------------------- (a) lymphdx


def child_lymphdx(args: argparse.Namespace) -> dict[str, Any]:
    import csv

    import torch
    import torch.utils.tensorboard  # noqa: F401  (imported by the trainer; count it as an import)

    from lymphdx.core.config import load_config
    from lymphdx.engine.distributed import resolve_device
    from lymphdx.engine.train import train
    from lymphdx.engine.trainer import Trainer
    from lymphdx.models.multitask import build_model
    from lymphdx.workflows.evaluate import evaluate_run, read_predictions

    rss_imports = rss_kib()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_epoch_s: list[float] = []
    original = Trainer.train_epoch

    def train_epoch(self):
        t0 = time.perf_counter()
        try:
            return original(self)
        finally:
            train_epoch_s.append(time.perf_counter() - t0)

    Trainer.train_epoch = train_epoch
    over: dict[str, Any] = {"strategy": "ssmdmt", "seed": args.seed}
    over["data"] = {"cache_dir": str(args.cache)}
    over["training"] = {"device": args.device}
    if args.epochs:
        over["training"]["epochs"] = args.epochs
    cfg = load_config(preset="quick", overrides=over)
    t0 = time.perf_counter()
    train(cfg, args.run, args.weak, args.strong, progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate_run(args.run)
    eval_s = time.perf_counter() - t0
    with open(Path(args.run) / "history.csv", newline="") as f:
        epoch_s = [float(r["seconds"]) for r in csv.DictReader(f)]
    preds = read_predictions(Path(args.run) / "predictions_test.csv")
    peak = peak_rss_kib()
    device = resolve_device(cfg.training.device)
    return {
        "model": "lymphdx MultiTaskNet, quick preset, strategy ssmdmt",
        "params": _params(build_model(cfg.model)),
        "epochs": cfg.training.epochs,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "epoch_s": [round(s, 2) for s in epoch_s],
        "epoch_s_mean": round(sum(epoch_s) / len(epoch_s), 2),
        "train_epoch_s_mean": round(sum(train_epoch_s) / len(train_epoch_s), 2),
        "train_call_s": round(train_s, 1),
        "evaluate_s": round(eval_s, 1),
        "peak_rss_mib": mib(peak),
        "rss_after_imports_mib": mib(rss_imports),
        "peak_minus_imports_mib": mib(peak - rss_imports),
        "cuda_peak_mib": _cuda_peak(device),
        "best_epoch": metrics["best_epoch"],
        "best_val_auc": round(metrics["best_val_auc"], 4),
        "test": {
            "n": metrics["n"],
            "n_pos": metrics["n_pos"],
            "auc": round(metrics["auc"], 4),
            "auc_ci95": [round(v, 4) for v in metrics["auc_ci95"]],
        },
        "test_predictions": {pid: p for pid, (_, p) in preds.items()},
        "test_labels": {pid: y for pid, (y, _) in preds.items()},
    }


# ----------------------------------------------------------------------------- (b) MONAI


def child_monai(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from monai.networks.nets import DenseNet121

    from lymphdx.data.datasets import VolumeSet, epoch_order
    from lymphdx.engine.distributed import resolve_device
    from lymphdx.engine.losses import classification_loss
    from lymphdx.engine.run_data import load_run_data
    from lymphdx.engine.run_folder import load_run_config
    from lymphdx.stats.metrics import auc, bootstrap_auc_ci

    rss_imports = rss_kib()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run_config(args.run)  # run (a)'s resolved config: same data, seed, optimiser
    data = load_run_data(cfg, Path(args.run), need_strong=False)
    train_set, val_set, test_set = (data.volumes("weak", s) for s in ("train", "val", "test"))
    tcfg, seed = cfg.training, cfg.seed
    epochs = args.epochs or tcfg.epochs

    device = resolve_device(cfg.training.device)  # where run (a) trained
    torch.manual_seed(seed)
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=1).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    @torch.no_grad()
    def predict(volumes: VolumeSet) -> np.ndarray:
        model.eval()
        out = []
        for start in range(0, len(volumes), 4):
            batch = volumes.batch(range(start, min(start + 4, len(volumes))))
            out.append(torch.sigmoid(model(batch.images.to(device))[:, 0]).cpu().numpy())
        model.train()
        return np.concatenate(out)

    best = {"val_auc": -1.0, "val_loss": float("inf"), "epoch": -1}
    best_state = None
    epoch_s, train_epoch_s = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        torch.manual_seed(seed * 100_003 + epoch)  # as the trainer
        model.train()
        batches = epoch_order(len(train_set), tcfg.batch_size, seed, epoch, 0)
        if len(batches) > 1 and len(batches[-1]) < 2:  # as the trainer: no batch of 1
            batches[-2] += batches.pop()
        losses = []
        for step, index in enumerate(batches):
            flip_rng = np.random.default_rng([seed, epoch, step, 7])  # the trainer's draws
            flips = (flip_rng.random(len(index)) < 0.5).tolist() if tcfg.flip_augment else None
            batch = train_set.batch(index, flips)
            logits = model(batch.images.to(device))[:, 0]
            loss = classification_loss(logits, batch.labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        train_epoch_s.append(time.perf_counter() - t0)
        probs = predict(val_set)
        labels = val_set.labels
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        val_auc = auc(labels, probs)
        val_loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
        if val_auc > best["val_auc"] or (
            val_auc == best["val_auc"] and val_loss < best["val_loss"]
        ):
            best = {"val_auc": val_auc, "val_loss": val_loss, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
        epoch_s.append(time.perf_counter() - t0)
        log(
            f"monai epoch {epoch}: loss {np.mean(losses):.3f} val_auc {val_auc:.3f} "
            f"{epoch_s[-1]:.1f} s"
        )
    model.load_state_dict(best_state)
    probs = predict(test_set)
    labels = test_set.labels
    ci = bootstrap_auc_ci(labels, probs, cfg.evaluation.bootstrap, cfg.evaluation.ci, seed=cfg.seed)
    peak = peak_rss_kib()
    return {
        "model": "monai.networks.nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)",
        "params": _params(model),
        "epochs": epochs,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "epoch_s": [round(s, 2) for s in epoch_s],
        "epoch_s_mean": round(sum(epoch_s) / len(epoch_s), 2),
        "train_epoch_s_mean": round(sum(train_epoch_s) / len(train_epoch_s), 2),
        "peak_rss_mib": mib(peak),
        "rss_after_imports_mib": mib(rss_imports),
        "peak_minus_imports_mib": mib(peak - rss_imports),
        "cuda_peak_mib": _cuda_peak(device),
        "best_epoch": best["epoch"],
        "best_val_auc": round(best["val_auc"], 4),
        "test": {
            "n": int(len(labels)),
            "n_pos": int(labels.sum()),
            "auc": round(auc(labels, probs), 4),
            "auc_ci95": [round(v, 4) for v in ci],
        },
        "test_predictions": {
            pid: float(p) for pid, p in zip(test_set.patient_ids, probs, strict=True)
        },
        "test_labels": {pid: int(y) for pid, y in zip(test_set.patient_ids, labels, strict=True)},
    }


# ----------------------------------------------------------------------------- parent


def paired(a: dict[str, Any], b: dict[str, Any], cfg_seed: int, n_boot: int) -> dict[str, Any]:
    import numpy as np

    from lymphdx.stats.metrics import delong_paired, paired_bootstrap_delta_ci

    ids = sorted(a["test_labels"])
    if ids != sorted(b["test_labels"]):
        raise SystemExit("the two models were scored on different test patients")
    y = np.array([a["test_labels"][i] for i in ids])
    sa = np.array([a["test_predictions"][i] for i in ids])
    sb = np.array([b["test_predictions"][i] for i in ids])
    test = delong_paired(y, sa, sb).to_dict()
    return {
        "a": "lymphdx ssmdmt",
        "b": "MONAI DenseNet121",
        "delong": {
            k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v])
            for k, v in test.items()
        },  # fmt: skip
        "delta_auc_ci95_paired_bootstrap": [
            round(v, 4) for v in paired_bootstrap_delta_ci(y, sa, sb, n_boot, seed=cfg_seed)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="synthetic data folder (reused, or written)")
    ap.add_argument("--cache", type=Path, help="preprocessing cache (default: a temp folder)")
    ap.add_argument("--epochs", type=int, default=0, help="0: the preset's (16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-weak", type=int, default=123)
    ap.add_argument("--n-pos", type=int, default=57)
    ap.add_argument("--n-strong", type=int, default=85)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 24 + 16 scans, 2 epochs")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (data, runs)")
    ap.add_argument("--child", choices=("lymphdx", "monai"), help=argparse.SUPPRESS)
    ap.add_argument("--weak", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--strong", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child == "lymphdx":
        emit(child_lymphdx(args))
        return
    if args.child == "monai":
        emit(child_monai(args))
        return
    if args.quick:
        args.n_weak, args.n_pos, args.n_strong, args.epochs = 24, 11, 16, 2
    work = Path(tempfile.mkdtemp(prefix="lymphdx-monai-compare-"))
    t_start = time.perf_counter()
    try:
        weak, strong, gen_s = ensure_synthetic(
            args.data or work / "data", args.n_weak, args.n_pos, args.n_strong
        )
        cache = args.cache or work / "cache"
        run = work / "run-ssmdmt"
        common = ["--cache", str(cache), "--run", str(run), "--epochs", str(args.epochs)]
        common += ["--seed", str(args.seed), "--threads", str(args.threads)]
        common += ["--device", args.device]
        log(f"(a) lymphdx ssmdmt: train + evaluate in a subprocess ({run})")
        a = run_child(
            Path(__file__), ["lymphdx", "--weak", str(weak), "--strong", str(strong), *common]
        )
        log(f"(a) test AUC {a['test']['auc']} {a['test']['auc_ci95']}, {a['epoch_s_mean']} s/epoch")
        log("(b) MONAI DenseNet121 on the same splits, in a subprocess")
        b = run_child(Path(__file__), ["monai", *common])
        log(f"(b) test AUC {b['test']['auc']} {b['test']['auc_ci95']}, {b['epoch_s_mean']} s/epoch")

        from lymphdx.engine.run_folder import load_run_config

        cfg = load_run_config(run)
        test = paired(a, b, cfg.seed, cfg.evaluation.bootstrap)
        for r in (a, b):
            r.pop("test_labels")
        data_note = (
            str(args.data)
            if args.data
            else f"generated: {args.n_weak} weak ({args.n_pos} positive), {args.n_strong} strong"
        )
        emit(
            {
                "benchmark": "monai_compare",
                "data": data_note,
                "generate_seconds": gen_s,
                "settings": {
                    "preset": "quick",
                    "epochs": cfg.training.epochs,
                    "batch_size": cfg.training.batch_size,
                    "optimizer": f"Adam lr {cfg.training.lr} weight_decay "
                    f"{cfg.training.weight_decay}",
                    "flip_augment": cfg.training.flip_augment,
                    "input_shape_xyz": list(cfg.data.shape),
                    "seed": cfg.seed,
                    "selection": "best validation AUC (ties: lower validation BCE)",
                    "bootstrap": cfg.evaluation.bootstrap,
                },
                "lymphdx_ssmdmt": a,
                "monai_densenet121": b,
                "paired_test": test,
                "ratios_monai_over_lymphdx": {
                    "params": round(b["params"] / a["params"], 1),
                    "epoch_s": round(b["epoch_s_mean"] / a["epoch_s_mean"], 2),
                    "train_epoch_s": round(b["train_epoch_s_mean"] / a["train_epoch_s_mean"], 2),
                    "peak_minus_imports": round(
                        b["peak_minus_imports_mib"] / a["peak_minus_imports_mib"], 2
                    ),
                },
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "machine": machine(args.threads),
            }
        )
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
