"""The trainer: strategies route only their losses, propagation, resume, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lymphdx.core.errors import LymphdxError
from lymphdx.core.strategies import STRATEGIES
from lymphdx.data import preprocess
from lymphdx.engine import propagation
from lymphdx.engine.inferer import SlidingWindowInferer
from lymphdx.engine.propagation import (
    is_propagation_epoch,
    predict_volumes,
    propagate_mask_targets,
    pseudo_labels,
)
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_checkpoint
from lymphdx.engine.train import train
from lymphdx.io.volumes import read_volume
from lymphdx.models.multitask import build_model
from lymphdx.workflows.evaluate import evaluate_run
from lymphdx.workflows.predict import predict
from tests.conftest import tiny_config


def _manifests(data: Path) -> tuple[Path, Path]:
    return data / "weak" / "manifest.csv", data / "strong" / "manifest.csv"


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"image": [], "mask": []}
    image, mask = preprocess.PreprocessCache.image, preprocess.PreprocessCache.mask

    def image_spy(self, path, patient=None):  # type: ignore[no-untyped-def]
        seen["image"].append(str(path))
        return image(self, path, patient)

    def mask_spy(self, mask_path, image_path, patient=None):  # type: ignore[no-untyped-def]
        seen["mask"].append(str(mask_path))
        return mask(self, mask_path, image_path, patient)

    monkeypatch.setattr(preprocess.PreprocessCache, "image", image_spy)
    monkeypatch.setattr(preprocess.PreprocessCache, "mask", mask_spy)
    return seen


def _initial_state(config) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    torch.manual_seed(config.seed)
    return build_model(config.model).state_dict()


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_routes_only_its_losses(
    strategy: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = STRATEGIES[strategy]
    config = tiny_config(tmp_path, strategy=strategy)
    seen = _record_reads(monkeypatch)
    weak, strong = _manifests(tiny_data)
    train(config, tmp_path / "run", weak, strong, progress=False)

    strong_images = [p for p in seen["image"] if "/strong/" in p]
    assert bool(strong_images) == flags.uses_strong
    assert bool(seen["mask"]) == flags.roi_strong  # masks only where the ROI loss is used
    # weak-set ground truth is never read by training
    assert not any("weak_truth" in p for p in seen["image"] + seen["mask"])

    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    before = _initial_state(config)
    assert _changed(before, state["model"], "encoder.")
    # the decoder learns from masks, or from scan labels when the classifier attends to it
    attention = config.model.pool == "attention"
    assert _changed(before, state["model"], "decoder.") == (flags.trains_decoder or attention)

    with open(tmp_path / "run" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    last = rows[-1]  # epoch 1: after the first propagation
    assert bool(last["loss_roi"]) == flags.roi_strong
    assert bool(last["loss_pseudo_cls"]) == flags.pseudo_cls_strong
    assert bool(last["loss_pseudo_roi"]) == flags.pseudo_roi_weak
    assert int(last["propagated"]) == int(flags.propagates)
    assert rows[0]["loss_pseudo_cls"] == "" and rows[0]["loss_pseudo_roi"] == ""  # warm-up


def test_propagation_schedule() -> None:
    from lymphdx.core.config import PropagationConfig

    cfg = PropagationConfig(warmup_epochs=3, every=2)
    assert [e for e in range(10) if is_propagation_epoch(e, cfg)] == [3, 5, 7, 9]


def test_propagated_labels_come_from_the_model_and_zeta_is_applied(
    tiny_data: Path, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path)
    weak, strong = _manifests(tiny_data)
    config = config.model_validate(
        {**config.model_dump(), "manifests": {"weak": str(weak), "strong": str(strong)}}
    )
    data = load_run_data(config, tmp_path)
    volumes = data.volumes("strong", "train")
    torch.manual_seed(0)
    model = build_model(config.model)
    with torch.no_grad():
        model.classifier.fc2.bias.fill_(20.0)
    targets, weights = pseudo_labels(predict_volumes(model, volumes), config.propagation)
    assert targets.tolist() == [1.0] * len(volumes)
    with torch.no_grad():
        model.classifier.fc2.bias.fill_(-20.0)
    targets, _ = pseudo_labels(predict_volumes(model, volumes), config.propagation)
    assert targets.tolist() == [0.0] * len(volumes)  # change the model, labels change
    # soft labels and the confidence cut-off
    soft_cfg = config.propagation.model_copy(update={"pseudo_labels": "soft", "confidence": 0.5})
    with torch.no_grad():
        model.classifier.fc2.bias.fill_(0.0)
        model.classifier.fc2.weight.zero_()
    targets, weights = pseudo_labels(predict_volumes(model, volumes), soft_cfg)
    assert np.allclose(targets, 0.5) and weights.sum() == 0  # p = 0.5 is not confident

    # ζ: a decoder whose output probability is exactly known
    weak_volumes = data.volumes("weak", "train")
    with torch.no_grad():
        head = model.decoder.head[-1]
        head.weight.zero_()
        head.bias.fill_(float(np.log(0.85 / 0.15)))  # p = 0.85 everywhere
    assert (
        propagate_mask_targets(model, weak_volumes, config.propagation)[0].min() == 1
    )  # 0.85 > ζ = 0.8
    high = config.propagation.model_copy(update={"roi_threshold": 0.9})
    assert propagate_mask_targets(model, weak_volumes, high)[0].max() == 0  # 0.85 < 0.9


def test_propagation_masks_depend_on_the_model(tiny_data: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    weak, strong = _manifests(tiny_data)
    config = config.model_validate(
        {**config.model_dump(), "manifests": {"weak": str(weak), "strong": str(strong)}}
    )
    volumes = load_run_data(config, tmp_path).volumes("weak", "train")
    torch.manual_seed(0)
    model = build_model(config.model)
    cfg = config.propagation.model_copy(update={"roi_threshold": 0.5})
    with torch.no_grad():
        model.decoder.head[-1].bias.fill_(0.0)
    a = propagation.propagate_mask_targets(model, volumes, cfg)[0]
    with torch.no_grad():
        model.decoder.head[-1].bias.fill_(5.0)
    b = propagation.propagate_mask_targets(model, volumes, cfg)[0]
    assert a.shape == (len(volumes), 16, 32, 32)
    assert b.mean() > a.mean()


def test_resume_continues_the_same_run(tiny_data: Path, tmp_path: Path) -> None:
    weak, strong = _manifests(tiny_data)
    full = tiny_config(tmp_path, training={"epochs": 2})
    train(full, tmp_path / "a", weak, strong, progress=False)
    first = tiny_config(tmp_path, training={"epochs": 1})
    train(first, tmp_path / "b", weak, strong, progress=False)
    with pytest.raises(LymphdxError, match="already holds a run"):
        train(first, tmp_path / "b", weak, strong, progress=False)
    train(full, tmp_path / "b", weak, strong, resume=True, progress=False)

    def history(run: str) -> list[dict]:
        with open(tmp_path / run / "history.csv") as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]

    assert history("a") == history("b")
    sa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # another config cannot resume this run
    other = tiny_config(tmp_path, training={"epochs": 2, "lr": 0.01})
    with pytest.raises(LymphdxError, match="training.lr"):
        train(other, tmp_path / "b", weak, strong, resume=True, progress=False)


def test_end_to_end_train_evaluate_predict(tiny_data: Path, tmp_path: Path) -> None:
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "run"
    train(tiny_config(tmp_path), run, weak, strong, progress=False)
    for name in ("config.yaml", "splits.csv", "history.csv", "normalization.json", "train.log"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "best.pt").exists() and (run / "checkpoints" / "last.pt").exists()
    assert any((run / "tensorboard").iterdir())

    metrics = evaluate_run(run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == metrics
    with open(run / "splits.csv") as f:
        test_rows = [r for r in csv.DictReader(f) if r["set"] == "weak" and r["split"] == "test"]
    assert saved["split"] == "test" and saved["n"] == len(test_rows)
    assert saved["n_pos"] == sum(int(r["label"]) for r in test_rows)
    lo, hi = saved["auc_ci95"]
    assert 0.0 <= lo <= saved["auc"] <= hi <= 1.0

    image = tiny_data / "weak" / "images" / "W0001.nii.gz"
    out = tmp_path / "pred"
    (result,) = predict(run, [image], out)
    folder = out / "W0001"
    pred = json.loads((folder / "prediction.json").read_text())
    assert 0.0 <= pred["probability"] <= 1.0 and pred["label"] in (0, 1)
    # the threshold of the operating point that evaluate chose on the validation patients
    chosen = json.loads((run / "calibration.json").read_text())["operating_point"]["threshold"]
    assert pred["threshold"] == chosen and pred["roi_threshold"] == 0.8
    source = nib.load(str(image))
    for name in ("roi_prob.nii.gz", "roi_mask.nii.gz"):
        written = nib.load(str(folder / name))
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    mask = np.asarray(nib.load(str(folder / "roi_mask.nii.gz")).dataobj)
    prob = np.asarray(nib.load(str(folder / "roi_prob.nii.gz")).dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(mask > 0, prob > 0.8)
    assert (folder / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_volume(folder / "roi_prob.nii.gz").geometry.close_to(read_volume(image).geometry)
    # one finding per connected component of the mask, in prediction.json, findings.csv
    # and the Slicer point list alike
    from scipy import ndimage

    n_components = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))[1]
    with open(folder / "findings.csv") as f:
        rows = list(csv.DictReader(f))
    markups = json.loads((folder / "findings.mrk.json").read_text())
    assert len(rows) == len(pred["findings"]) == n_components
    assert len(markups["markups"][0]["controlPoints"]) == n_components
    assert (pred["findings_note"] is None) == (n_components > 0)
    maxima = [float(r["max_probability"]) for r in rows]
    assert maxima == sorted(maxima, reverse=True)


def test_training_scores_through_the_sliding_window_inferer(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``evaluation.inferer: sliding_window`` validation (weak-val AUC, strong-val
    Dice) and propagation (the strong set's pseudo labels, the weak set's pseudo masks)
    score every scan through the tiled inferer, one scan at a time."""
    calls: list[tuple[tuple[int, ...], bool]] = []
    real = SlidingWindowInferer.__call__

    def spy(self, model, images, roi=True, flips=False):  # type: ignore[no-untyped-def]
        calls.append((tuple(images.shape), roi))
        return real(self, model, images, roi, flips)

    monkeypatch.setattr(SlidingWindowInferer, "__call__", spy)
    config = tiny_config(
        tmp_path,
        evaluation={"inferer": "sliding_window"},
        inference={"tile": [16, 16, 16], "overlap": 0.5, "bag_tiles": 2},
    )
    assert config.strategy == "ssmdmt" and config.propagation.warmup_epochs == 1
    run = tmp_path / "run"
    train(config, run, *_manifests(tiny_data), progress=False)
    with open(run / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    n = {(r["set"], r["split"]): 0 for r in rows}
    for r in rows:
        n[(r["set"], r["split"])] += 1
    # two epochs of validation; one propagation round (epoch 1); at the end the decoder's
    # status on all strong training + validation scans (roi_status.json)
    strong_fit = n[("strong", "train")] + n[("strong", "val")]
    assert sum(not roi for _, roi in calls) == 2 * n[("weak", "val")] + n[("strong", "train")]
    assert sum(roi for _, roi in calls) == (
        2 * n[("strong", "val")] + n[("weak", "train")] + strong_fit
    )
    assert {shape[0] for shape, _ in calls} == {1}
    with open(run / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert all(r["strong_val_dice"] not in ("", None) for r in history)
