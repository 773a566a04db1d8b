"""The ROI patches' batch-norm statistics re-estimated after training
(``evaluation.bn_stats: roi_patches``, ``lymphdx.engine.patch_stats``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lymphdx.core.errors import LymphdxError
from lymphdx.engine.domain_stats import stats_path
from lymphdx.engine.patch_stats import (
    PATCH_BATCHES,
    estimate_patch_stats,
    roi_patch_batches,
)
from lymphdx.engine.roi_status import read_roi_status
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model, load_run_config
from lymphdx.engine.train import train
from lymphdx.models.domain_norm import DomainBatchNorm3d
from lymphdx.models.multitask import build_model
from lymphdx.workflows.evaluate import evaluate_run, read_predictions
from tests.conftest import tiny_config


class _Strong:
    """A stand-in for the strong training ``VolumeSet``: ``len``, ``image``, ``mask``."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def mask(self, i: int) -> np.ndarray:
        return self.masks[i]


class _Data:
    def __init__(self, strong: _Strong) -> None:
        self.strong = strong

    def volumes(self, domain: str, split: str, masks: bool = False) -> _Strong:
        assert (domain, split, masks) == ("strong", "train", True)
        return self.strong


def _scans(n: int) -> _Strong:
    """Scans of 0 with a 3^3 node of value 10 at a random place; the mask marks it."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(n):
        image = np.zeros((32, 64, 64), np.float32)
        mask = np.zeros(image.shape, np.uint8)
        z, y, x = rng.integers(2, 29), rng.integers(2, 61), rng.integers(2, 61)
        image[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 10.0
        mask[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 1
        images.append(image)
        masks.append(mask)
    return _Strong(images, masks)


def _config(tmp_path: Path, foreground: float):
    return tiny_config(
        tmp_path,
        training={"roi_patch": [16, 32, 16], "roi_foreground": foreground, "strong_batch_size": 3},
        evaluation={"bn_stats": "roi_patches"},
    )


def test_patches_are_drawn_as_training_draws_them(tmp_path: Path) -> None:
    """Batches of training.strong_batch_size patches of training.roi_patch (x, y, z given,
    (z, y, x) cut); with roi_foreground 1 every patch holds node voxels, with 0 most do
    not; the draw is fixed by the run's seed."""
    strong = _scans(5)
    on = list(roi_patch_batches(_config(tmp_path, 1.0), strong, 20))  # type: ignore[arg-type]
    assert len(on) == 20 and all(b.shape == (3, 1, 16, 32, 16) for b in on)
    assert all(float(p.max()) == 10.0 for b in on for p in b)
    off = torch.cat(list(roi_patch_batches(_config(tmp_path, 0.0), strong, 20)))  # type: ignore[arg-type]
    assert float((off.amax(dim=(1, 2, 3, 4)) == 10.0).float().mean()) < 0.3
    again = torch.cat(list(roi_patch_batches(_config(tmp_path, 1.0), strong, 20)))  # type: ignore[arg-type]
    assert torch.equal(again, torch.cat(on))


def test_the_statistics_are_the_patches_own(tmp_path: Path) -> None:
    """Every batch norm keeps its γ and β; the stem's statistics are the mean over the
    patch batches of the stem convolution's per-batch channel mean and variance, computed
    here by hand from the same draw."""
    config = _config(tmp_path, 0.5)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    strong = _scans(4)
    conv, bn = model.encoder.stem[0], model.encoder.stem[1]
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    means, variances = [], []
    with torch.no_grad():
        for batch in roi_patch_batches(config, strong):  # type: ignore[arg-type]
            y = conv(batch)
            means.append(y.mean(dim=(0, 2, 3, 4)))
            variances.append(y.var(dim=(0, 2, 3, 4), unbiased=True))
    assert len(means) == PATCH_BATCHES
    estimate_patch_stats(model, config, _Data(strong))  # type: ignore[arg-type]
    stem = model.encoder.stem[1]
    assert isinstance(stem, torch.nn.BatchNorm3d) and not model.training
    torch.testing.assert_close(stem.running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stem.running_var, torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(stem.weight.detach(), gamma)
    torch.testing.assert_close(stem.bias.detach(), beta)


def test_a_run_without_patches_or_strong_scans_is_refused(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, evaluation={"bn_stats": "roi_patches"})
    model = build_model(config.model)
    with pytest.raises(LymphdxError, match="training.roi_patch unset"):
        estimate_patch_stats(model, config, _Data(_scans(2)))  # type: ignore[arg-type]
    with pytest.raises(LymphdxError, match="strong set's training scans, and it has none"):
        estimate_patch_stats(model, _config(tmp_path, 0.5), _Data(_Strong([], [])))  # type: ignore[arg-type]


def test_a_run_scored_with_the_patches_statistics(tiny_data: Path, tmp_path: Path) -> None:
    """``evaluate`` of a finished run (trained on ROI patches) with ``bn_stats:
    roi_patches`` keeps plain batch norms, stores the statistics and reads them back; the
    scores change, the weights do not."""
    config = tiny_config(
        tmp_path,
        training={"epochs": 1, "roi_patch": [16, 16, 16]},
        evaluation={"tta_flip": False},
        # a one-epoch decoder's map stays under 0.05: a threshold that some voxels pass
        propagation={"roi_threshold": 0.01},
    )
    run = tmp_path / "run"
    train(
        config,
        run,
        tiny_data / "weak/manifest.csv",
        tiny_data / "strong/manifest.csv",
        progress=False,
    )
    evaluate_run(run, "test", detection=False)
    before = read_predictions(run / "predictions_test.csv")
    _, trained, _ = load_model(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["evaluation"]["bn_stats"] = "roi_patches"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    evaluate_run(run, "test", detection=False)
    after = read_predictions(run / "predictions_test.csv")
    assert after.keys() == before.keys()
    assert not np.allclose([after[k][1] for k in after], [before[k][1] for k in after])
    _, model, _ = load_model(run)
    assert not any(isinstance(m, DomainBatchNorm3d) for m in model.modules())
    stored = torch.load(stats_path(run), weights_only=True)
    assert stored["stamp"]["bn_stats"] == "roi_patches"
    assert stored["stamp"]["roi_patch"] == [16, 16, 16]
    state, old = model.state_dict(), trained.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored["state"].items())
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(state[k], old[k]) for k in state if not k.endswith(buffers))
    means = [k for k in stored["state"] if k.endswith("running_mean")]
    assert means and all(not torch.equal(state[k], old[k]) for k in means)
    # the switches read the decoder as scored: Dice at ζ on all strong train + val scans
    # with these statistics, worked here scan by scan
    status = read_roi_status(run)
    assert status is not None and status["bn_stats"] == "roi_patches"
    assert json.loads((run / "roi_status_roi_patches.json").read_text()) == status
    data = load_run_data(load_run_config(run), run)
    inter = total = predicted = 0
    for split in ("train", "val"):
        volumes = data.volumes("strong", split, masks=True)
        for i in range(len(volumes)):
            with torch.no_grad():
                roi = model(torch.from_numpy(volumes.image(i))[None, None], roi=True)["roi"]
            pred, truth = torch.sigmoid(roi[0, 0]).numpy() > 0.01, volumes.mask(i) > 0
            inter, total = inter + int((pred & truth).sum()), total + int(pred.sum() + truth.sum())
            predicted += int(pred.sum())
    assert (
        predicted > 0 and inter > 0 and status["dice"] == pytest.approx(2 * inter / total, abs=1e-6)
    )
    assert status["n_scans"] == 10
    # scored under the trained statistics again: training's own status
    saved["evaluation"]["bn_stats"] = "trained"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert read_roi_status(run) == json.loads((run / "roi_status.json").read_text())
