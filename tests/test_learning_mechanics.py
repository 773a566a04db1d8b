"""Training counted in steps: seeded batch streams, ROI patches, MONAI augmentation,
attention pooling on the ROI decoder's map, the ROI warm-up, the Dice-gated propagation,
resume replay and parallel ``compare`` runs, each on tiny data."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lymphdx.core.config import AugmentationConfig, Config, ModelConfig, load_config
from lymphdx.core.errors import ConfigError
from lymphdx.data.augment import Augmenter
from lymphdx.data.sampling import patch_corner, stream_batches
from lymphdx.data.tile_sampler import crop_padded as crop
from lymphdx.engine import batches, propagation
from lymphdx.engine.run_folder import load_checkpoint
from lymphdx.engine.train import train
from lymphdx.models.multitask import Classifier, MultiTaskNet, build_model
from tests.helpers import cache, one_thread  # noqa: F401  (fixtures)
from tests.helpers import history as _history
from tests.helpers import manifests as _manifests
from tests.helpers import run_config as _config


def _ckpt(run: Path, name: str) -> dict[str, Any]:
    return load_checkpoint(run / "checkpoints" / f"{name}.pt")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The new training options at once: steps, ROI warm-up, patches (x y z, divisible by the
# tiny model's downsampling of 16), augmentation, AdamW, EMA-last selection, attention.
STEPS = 2
MECHANICS: dict[str, Any] = {
    "training": {
        "steps_per_epoch": STEPS,
        "roi_warmup_epochs": 1,
        "roi_patch": [16, 16, 16],
        "strong_batch_size": 2,
        "augmentation": {"enabled": True},
        "optimizer": "adamw",
        "selection": "ema_last",
    },
    "model": {"pool": "attention"},
}


def _mechanics(cache: Path, strategy: str, epochs: int, **sections: dict[str, Any]) -> Config:
    over = {k: dict(v) for k, v in MECHANICS.items()}
    for key, value in sections.items():
        over.setdefault(key, {}).update(value)
    over["training"]["epochs"] = epochs
    return _config(cache, strategy=strategy, **over)


# -- sampling.stream_batches -------------------------------------------------------------


def _hand_stream(n: int, size: int, seed: int, stream: int, total: int) -> list[int]:
    """The first ``total`` items of the endless sequence of seeded passes."""
    items: list[int] = []
    k = 0
    while len(items) < total:
        items += np.random.default_rng([seed, stream, k]).permutation(n).tolist()
        k += 1
    return items[:total]


@pytest.mark.parametrize(
    ("n", "batch_size", "steps"), [(5, 3, 4), (7, 2, 3), (3, 5, 2), (4, 4, 3), (1, 2, 3)]
)
def test_stream_batches_follow_the_seeded_passes(n: int, batch_size: int, steps: int) -> None:
    seed, stream, epochs = 11, 2, 4
    size = min(batch_size, n)
    flat = _hand_stream(n, size, seed, stream, epochs * steps * size)
    for epoch in range(epochs):
        batches = stream_batches(n, batch_size, steps, seed, epoch, stream)
        assert len(batches) == steps
        assert all(len(b) == size for b in batches)  # min(batch_size, n) items, always
        # epoch e continues where epoch e - 1 ended
        start = epoch * steps * size
        expected = flat[start : start + steps * size]
        assert [i for b in batches for i in b] == expected, epoch
        assert batches == stream_batches(n, batch_size, steps, seed, epoch, stream)
    # the first pass is a permutation: no item repeats before every item came once
    first = [i for b in stream_batches(n, batch_size, steps, seed, 0, stream) for i in b][:n]
    assert len(set(first)) == len(first)


def test_stream_batches_depend_on_seed_and_stream_only() -> None:
    a = stream_batches(20, 4, 5, seed=3, epoch=1, stream=0)
    assert a == stream_batches(20, 4, 5, seed=3, epoch=1, stream=0)
    assert a != stream_batches(20, 4, 5, seed=3, epoch=1, stream=1)
    assert a != stream_batches(20, 4, 5, seed=4, epoch=1, stream=0)
    assert a != stream_batches(20, 4, 5, seed=3, epoch=2, stream=0)
    # a batch of the whole set when the set is smaller than a batch
    assert all(sorted(b) == [0, 1, 2] for b in stream_batches(3, 8, 4, 0, 0, 0))
    assert stream_batches(0, 4, 3, 0, 0, 0) == []
    assert stream_batches(5, 4, 0, 0, 0, 0) == []


# -- sampling.patch_corner, crop -----------------------------------------------------------

SHAPE = (12, 20, 16)
PATCH = (4, 8, 6)


def _inside(corner: tuple[int, ...]) -> bool:
    return all(0 <= c <= s - p for c, s, p in zip(corner, SHAPE, PATCH, strict=True))


def _covers(corner: tuple[int, ...], voxel: tuple[int, ...] | np.ndarray) -> bool:
    return all(c <= v < c + p for c, v, p in zip(corner, voxel, PATCH, strict=True))


def test_foreground_patches_always_hold_a_node_voxel() -> None:
    mask = np.zeros(SHAPE, np.uint8)
    nodes = [(0, 19, 0), (11, 0, 15), (6, 10, 8)]  # two at opposite corners of the volume
    for v in nodes:
        mask[v] = 1
    for s in range(300):
        corner = patch_corner(mask, PATCH, 1.0, np.random.default_rng(s))
        assert len(corner) == 3 and all(isinstance(c, int) for c in corner)
        assert _inside(corner), corner
        assert any(_covers(corner, v) for v in nodes), corner
        assert crop(mask, corner, PATCH).any()
    # given node voxels (a subset) are the ones used
    only = np.array([nodes[0]])
    for s in range(100):
        corner = patch_corner(mask, PATCH, 1.0, np.random.default_rng(s), only)
        assert _covers(corner, nodes[0]) and _inside(corner)


def test_patches_without_foreground_spread_over_the_volume() -> None:
    mask = np.zeros(SHAPE, np.uint8)
    mask[6, 10, 8] = 1
    corners = np.array(
        [patch_corner(mask, PATCH, 0.0, np.random.default_rng(s)) for s in range(2000)]
    )
    assert all(_inside(tuple(c)) for c in corners)
    for axis, (s, p) in enumerate(zip(SHAPE, PATCH, strict=True)):
        # every position is reached, and the centres spread around the volume's middle
        assert set(corners[:, axis].tolist()) == set(range(s - p + 1)), axis
        centre = corners[:, axis] + p / 2
        assert abs(centre.mean() - s / 2) < 0.1 * s, axis
    covered = np.mean([_covers(tuple(c), (6, 10, 8)) for c in corners])
    assert covered < 0.5  # not drawn towards the node
    # an empty mask (or no voxels) with foreground 1 falls back to a uniform draw
    empty = np.zeros(SHAPE, np.uint8)
    for s in range(50):
        assert _inside(patch_corner(empty, PATCH, 1.0, np.random.default_rng(s)))
        none = np.zeros((0, 3), np.int64)
        assert _inside(patch_corner(mask, PATCH, 1.0, np.random.default_rng(s), none))
    # a patch the size of the volume sits at the origin
    assert patch_corner(mask, SHAPE, 1.0, np.random.default_rng(0)) == (0, 0, 0)


def test_mixed_foreground_share() -> None:
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 2, 3] = 1
    hits = np.mean(
        [
            _covers(patch_corner(mask, PATCH, 0.33, np.random.default_rng(s)), (1, 2, 3))
            for s in range(3000)
        ]
    )
    # P(hit) = 0.33 + 0.67 * P(a uniform patch covers the voxel): centres are uniform over
    # range(size), corners clipped: 4/12 · 7/20 · 7/16 of them cover (1, 2, 3)
    expected = 0.33 + 0.67 * (4 / 12) * (7 / 20) * (7 / 16)
    assert abs(hits - expected) < 0.03


def test_crop_takes_the_last_three_axes() -> None:
    volume = np.arange(2 * 12 * 20 * 16).reshape(2, *SHAPE)
    corner = (3, 5, 7)
    out = crop(volume, corner, PATCH)
    assert out.shape == (2, *PATCH)
    np.testing.assert_array_equal(out, volume[:, 3:7, 5:13, 7:13])
    np.testing.assert_array_equal(crop(volume[0], corner, PATCH), volume[0, 3:7, 5:13, 7:13])


# -- augment.Augmenter ----------------------------------------------------------------------

NO_INTENSITY: dict[str, Any] = {
    "intensity_scale": 0.0,
    "intensity_shift": 0.0,
    "noise_std": 0.0,
    "intensity_prob": 0.0,
}


def _blob(shape: tuple[int, int, int] = (10, 16, 14)) -> np.ndarray:
    """An asymmetric binary blob (uint8), so flips and rotations show."""
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    ball = (z - 4) ** 2 / 9 + (y - 6) ** 2 / 16 + (x - 5) ** 2 / 12 <= 1
    bar = (z >= 2) & (z <= 6) & (y >= 9) & (y <= 13) & (x >= 8) & (x <= 11)
    return (ball | bar).astype(np.uint8)


def _vols(mask: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image": mask.astype(np.float32),
        "mask": mask.copy(),
        "pseudo_mask": mask.copy(),
    }


def test_augmentation_replays_with_its_key_and_differs_between_keys() -> None:
    aug = Augmenter(AugmentationConfig(enabled=True, spatial_prob=1.0, flip_axes=(0, 1, 2)))
    mask = _blob()
    vols = _vols(mask)
    vols["image"] = vols["image"] + np.random.default_rng(0).normal(size=mask.shape).astype(
        np.float32
    )
    a = aug((0, 1, 2, 3, 4), vols)
    b = aug((0, 1, 2, 3, 4), {k: v.copy() for k, v in vols.items()})
    for k in vols:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].shape == vols[k].shape and a[k].dtype == vols[k].dtype
    np.testing.assert_array_equal(vols["mask"], mask)  # the inputs are left as they were
    others = [aug((0, 1, 2, 3, j), vols) for j in range(5, 9)]
    for o in others:
        assert not np.array_equal(o["image"], a["image"])
    assert sum(not np.array_equal(o["mask"], a["mask"]) for o in others) >= 3


def test_masks_stay_binary_with_their_dtype() -> None:
    aug = Augmenter(AugmentationConfig(enabled=True, spatial_prob=1.0, flip_axes=(0, 1, 2)))
    mask = _blob()
    vols = {
        "image": mask.astype(np.float32),
        "mask": mask,
        "pseudo_mask": mask[::-1].copy(),
        "pseudo_weight": np.ones_like(mask),
    }
    for j in range(6):
        out = aug((7, j), vols)
        assert out["image"].dtype == np.float32
        for k in ("mask", "pseudo_mask", "pseudo_weight"):
            assert out[k].dtype == np.uint8 and out[k].shape == mask.shape, k
            assert set(np.unique(out[k]).tolist()) <= {0, 1}, k
        assert out["mask"].any()


def test_one_spatial_draw_moves_image_mask_and_pseudo_mask_alike() -> None:
    cfg = AugmentationConfig(
        enabled=True,
        flip_axes=(0, 1, 2),
        rotate_deg=20.0,
        scale=0.15,
        spatial_prob=1.0,
        **NO_INTENSITY,
    )
    aug = Augmenter(cfg)
    mask = _blob()
    outs = [aug((3, j), _vols(mask)) for j in range(8)]
    for out in outs:
        # nearest neighbour (masks) and linear interpolation of a 0/1 image (> 0.5) agree
        # but for a few boundary voxels where trilinear weights split
        assert out["pseudo_mask"].dtype == np.uint8
        np.testing.assert_array_equal(out["pseudo_mask"], out["mask"])
        agree = (out["image"] > 0.5) == out["mask"].astype(bool)
        assert agree.mean() > 0.97
        assert out["mask"].sum() > 0.5 * mask.sum()
    # ... while an image disagrees on many more voxels with the mask of another draw
    for i, a in enumerate(outs):
        own = np.mean((a["image"] > 0.5) != a["mask"].astype(bool))
        for b in outs[:i] + outs[i + 1 :]:
            assert np.mean((a["image"] > 0.5) != b["mask"].astype(bool)) > 2 * own
    # a pseudo-mask of other content moves as a mask would under the same key
    other = np.ascontiguousarray(mask[::-1, :, ::-1])
    for j in range(4):
        both = aug((4, j), {"image": mask.astype(np.float32), "mask": mask, "pseudo_mask": other})
        alone = aug((4, j), {"image": mask.astype(np.float32), "mask": other})
        np.testing.assert_array_equal(both["pseudo_mask"], alone["mask"])
        np.testing.assert_array_equal(both["image"], alone["image"])


@pytest.mark.parametrize(("flip_axis", "array_axis"), [(0, 2), (1, 1), (2, 0)])
def test_flips_alone_reverse_the_matching_array_axis(flip_axis: int, array_axis: int) -> None:
    cfg = AugmentationConfig(
        enabled=True, flip_axes=(flip_axis,), rotate_deg=0.0, scale=0.0, **NO_INTENSITY
    )
    aug = Augmenter(cfg)
    mask = _blob()
    image = np.random.default_rng(1).normal(size=mask.shape).astype(np.float32)
    flipped = 0
    for j in range(16):
        out = aug((5, j), {"image": image, "mask": mask})
        if np.array_equal(out["image"], image):
            np.testing.assert_array_equal(out["mask"], mask)
        else:
            flipped += 1
            np.testing.assert_array_equal(out["image"], np.flip(image, array_axis))
            np.testing.assert_array_equal(out["mask"], np.flip(mask, array_axis))
    assert 0 < flipped < 16  # p = 0.5 each


def test_intensity_augmentation_leaves_the_masks_alone() -> None:
    cfg = AugmentationConfig(
        enabled=True, flip_axes=(), rotate_deg=0.0, scale=0.0, intensity_prob=1.0
    )
    aug = Augmenter(cfg)
    mask = _blob()
    image = np.random.default_rng(2).normal(size=mask.shape).astype(np.float32)
    out = aug((1,), {"image": image, "mask": mask, "pseudo_mask": mask})
    assert not np.allclose(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)
    np.testing.assert_array_equal(out["pseudo_mask"], mask)


def test_simulated_low_resolution_by_hand() -> None:
    """``low_res_prob: 1`` at zoom 0.5: the image downsampled to half its size by nearest
    neighbour and upsampled back trilinearly, computed here with torch; masks untouched."""
    cfg = AugmentationConfig(
        enabled=True,
        flip_axes=(),
        spatial_prob=0.0,
        **NO_INTENSITY,
        low_res_prob=1.0,
        low_res_zoom=(0.5, 0.5),
    )
    mask = _blob()
    image = np.random.default_rng(3).normal(size=mask.shape).astype(np.float32)
    out = Augmenter(cfg)((2,), {"image": image, "mask": mask})
    x = torch.from_numpy(image)[None, None]
    half = [s // 2 for s in image.shape]
    low = F.interpolate(x, size=half, mode="nearest")
    expected = F.interpolate(low, size=image.shape, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(out["image"], expected[0, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["mask"], mask)


def test_gamma_by_hand() -> None:
    """``gamma_prob: 1`` with gamma 2: the image rescaled to [0, 1] by its min and max,
    squared and mapped back."""
    cfg = AugmentationConfig(
        enabled=True,
        flip_axes=(),
        spatial_prob=0.0,
        **NO_INTENSITY,
        gamma_prob=1.0,
        gamma_range=(2.0, 2.0),
    )
    mask = _blob()
    image = np.random.default_rng(4).normal(size=mask.shape).astype(np.float32)
    out = Augmenter(cfg)((3,), {"image": image, "mask": mask})
    lo, span = float(image.min()), float(image.max() - image.min())
    np.testing.assert_allclose(out["image"], ((image - lo) / span) ** 2 * span + lo, atol=1e-4)
    np.testing.assert_array_equal(out["mask"], mask)


def test_low_resolution_and_gamma_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="low_res_zoom"):
        AugmentationConfig(low_res_zoom=(0.5, 1.5))
    with pytest.raises(ValueError, match="gamma_range"):
        AugmentationConfig(gamma_range=(1.5, 0.7))


# -- models.multitask: attention pooling, the ROI prior ------------------------------------


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max())
    return e / e.sum()


def test_attention_pooling_by_hand() -> None:
    torch.manual_seed(0)
    clf = Classifier(in_channels=3, hidden=4, pool="attention")
    assert clf.attention and clf.fc1.in_features == 3 + 1
    o = torch.randn(2, 3, 2, 3, 2, dtype=torch.float64)
    roi = torch.randn(2, 1, 8, 12, 6, dtype=torch.float64)
    got = clf.pooled(o.float(), roi.float()).double()
    assert got.shape == (2, 4)
    o_np, roi_np = o.numpy(), roi.numpy()
    for b in range(2):
        # max over each 4 x 4 x 3 block of ROI logits: one value per cell of o's grid
        blocks = roi_np[b, 0].reshape(2, 4, 3, 4, 2, 3).max(axis=(1, 3, 5))
        w = _softmax(blocks.ravel())
        expected = o_np[b].reshape(3, -1) @ w
        np.testing.assert_allclose(got[b, :3].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert got[b, 3].item() == pytest.approx(roi_np[b].max(), rel=1e-6)
    # adaptive_max_pool3d also for grids that do not divide
    odd = torch.randn(1, 1, 7, 5, 9)
    pooled = clf.attention_logits(odd, (2, 3, 2))
    torch.testing.assert_close(pooled, F.adaptive_max_pool3d(odd, (2, 3, 2)))
    # one dominant ROI logit: the pooling returns that cell of o
    peak = torch.full((1, 1, 8, 12, 6), -5.0)
    peak[0, 0, 5, 10, 1] = 60.0  # cell (1, 2, 0) of the 2 x 3 x 2 grid
    out = clf.pooled(o[:1].float(), peak)
    torch.testing.assert_close(out[0, :3], o[0, :, 1, 2, 0].float(), rtol=1e-5, atol=1e-5)
    assert out[0, 3].item() == 60.0
    with pytest.raises(ValueError, match="ROI decoder"):
        clf.pooled(o.float())
    with pytest.raises(ValueError, match="ROI decoder"):
        clf(o.float())


def _tiny_model(pool: str) -> MultiTaskNet:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            init_features=8,
            growth_rate=4,
            block_layers=(1, 1, 1, 1),
            classifier_hidden=8,
            pool=pool,
        )
    )


def test_attention_gives_the_decoder_gradient_from_the_scan_label() -> None:
    x = torch.randn(2, 1, 16, 32, 32)
    for pool, decoder_learns in (("attention", True), ("avgmax", False)):
        model = _tiny_model(pool)
        out = model(x, roi=False)
        assert set(out) == {"cls"} and out["cls"].shape == (2,)
        out["cls"].sum().backward()
        grads = [p.grad for p in model.decoder.parameters()]
        has = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert has == decoder_learns, pool
        assert any(p.grad is not None for p in model.classifier.parameters())
    model = _tiny_model("attention").eval()
    with torch.no_grad():
        full = model(x, roi=True)
        part = model(x, roi=slice(1, None))
        o, skips = model.encoder(x)
        roi = model.decoder(o, skips, tuple(x.shape[2:]))
        pooled = model.classifier.pooled(o, roi)
    assert full["roi"].shape == (2, 1, 16, 32, 32) and part["roi"].shape == (1, 1, 16, 32, 32)
    torch.testing.assert_close(part["roi"], full["roi"][1:])
    torch.testing.assert_close(part["cls"], full["cls"])  # the batch's cls is always whole
    torch.testing.assert_close(model.pooled(x), pooled, rtol=1e-4, atol=1e-4)
    assert pooled.shape == (2, model.encoder.out_channels + 1)


@pytest.mark.parametrize("pool", ["avgmax", "attention"])
def test_decoder_head_starts_at_the_roi_prior(pool: str) -> None:
    model = _tiny_model(pool)
    bias = model.decoder.head[-1].bias.detach()
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99.0)))
    assert torch.sigmoid(bias).double().sub(0.01).abs().max() < 1e-6
    with torch.no_grad():
        roi = torch.sigmoid(model(torch.randn(1, 1, 16, 32, 32), roi=True)["roi"])
    assert roi.mean().item() < 0.1  # the whole map starts near the prior, not at 0.5


# -- the trainer: steps, ROI warm-up, the Dice gate, resume -------------------------------


def test_steps_and_roi_warmup_in_history(
    tiny_data: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crops: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    keys: list[tuple[int, ...]] = []

    def crop_spy(volume: np.ndarray, corner: Any, patch: Any) -> np.ndarray:
        out = crop(volume, corner, patch)
        crops.append((tuple(patch), out.shape))
        return out

    real_call = Augmenter.__call__

    def augment_spy(self: Augmenter, key: Any, volumes: dict) -> dict:
        keys.append(tuple(key))
        return real_call(self, key, volumes)

    monkeypatch.setattr(batches, "crop_padded", crop_spy)
    monkeypatch.setattr(Augmenter, "__call__", augment_spy)
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "multitask"
    # patches of x 32, y 16, z 16 voxels: (16, 16, 32) arrays of the (16, 32, 32) volumes
    config = _mechanics(cache, "multitask", 3, training={"roi_patch": [32, 16, 16]})
    train(config, run, weak, strong, progress=False)
    rows = _history(run)
    assert crops and all(c == ((16, 16, 32), (16, 16, 32)) for c in crops)
    # every scan is augmented with its key (seed, epoch, step, stream, place in the batch):
    # the warm-up draws strong patches alone (stream 2), then weak scans (0) and patches
    assert len(keys) == len(set(keys))
    by_epoch = [sorted({k[3] for k in keys if k[1] == e}) for e in range(3)]
    assert by_epoch == [[2], [0, 2], [0, 2]]
    assert len(keys) == STEPS * 2 + 2 * STEPS * (4 + 2)  # patches 2, weak scans 4 a step
    assert len(crops) == 2 * STEPS * 2 * 3  # image and mask of 2 patches a step
    assert [int(r["step"]) for r in rows] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert [r["phase"] for r in rows] == ["roi-warmup", "joint", "joint"]
    assert rows[0]["loss_cls"] == "" and rows[0]["loss_roi"] != ""  # the decoder alone
    assert all(r["loss_cls"] != "" and r["loss_roi"] != "" for r in rows[1:])
    assert all(r["propagated"] == "0" and r["propagation_note"] == "" for r in rows)
    # ema_last: best.pt holds the EMA teacher's final weights
    last, best = _ckpt(run, "last"), _ckpt(run, "best")
    assert best["selection"] == "ema_last" and last["steps_done"] == 3 * STEPS
    assert _same_weights(best["model"], last["ema"]["model"])
    assert not _same_weights(best["model"], last["model"])


def test_supervised_has_no_roi_warmup_and_attention_trains_its_decoder(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "supervised"
    config = _mechanics(cache, "supervised", 2)
    train(config, run, weak, strong, progress=False)
    rows = _history(run)
    assert [int(r["step"]) for r in rows] == [STEPS, 2 * STEPS]
    assert [r["phase"] for r in rows] == ["joint", "joint"]
    assert all(r["loss_cls"] != "" and r["loss_roi"] == "" for r in rows)
    torch.manual_seed(config.seed)
    before = build_model(config.model).state_dict()
    after = _ckpt(run, "last")["model"]
    keys = [k for k in before if k.startswith("decoder.") and before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[k]) for k in keys)


def test_unreachable_dice_gate_holds_propagation_back(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "gated"
    config = _mechanics(
        cache, "ssmdmt", 3, propagation={"warmup_epochs": 1, "every": 1, "dice_gate": 1.0}
    )
    train(config, run, weak, strong, progress=False)
    rows = _history(run)
    assert [r["phase"] for r in rows] == ["roi-warmup", "joint", "joint"]
    assert all(r["propagated"] == "0" for r in rows)
    assert all(r["loss_pseudo_cls"] == "" and r["loss_pseudo_roi"] == "" for r in rows)
    assert rows[0]["propagation_note"] == "warm-up until epoch 1"
    n_strong = sum(
        1
        for r in csv.DictReader((run / "splits.csv").open())
        if r["set"] == "strong" and r["split"] in ("train", "val")
    )
    for r in rows[1:]:  # the gate reads all strong training + validation scans
        note = r["propagation_note"]
        prefix = f"waiting: Dice on {n_strong} strong training + validation scans "
        assert note.startswith(prefix) and note.endswith(" < gate 1"), note
        assert float(note[len(prefix) :].split()[0]) == pytest.approx(
            float(r["gate_dice"]), abs=5e-4
        )
        assert int(r["gate_scans"]) == n_strong
    assert rows[0]["gate_dice"] == ""  # not read during the warm-up
    assert _ckpt(run, "last")["propagation_start"] is None


@pytest.mark.parametrize(("warmup", "roi_warmup"), [(1, 2), (2, 1)])
def test_open_dice_gate_starts_after_both_warmups_and_warns_of_empty_masks(
    warmup: int, roi_warmup: int, tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "open"
    config = _mechanics(
        cache,
        "ssmdmt",
        4,
        training={"roi_warmup_epochs": roi_warmup},
        # ζ = 1: no sigmoid exceeds it, so every pseudo ROI mask is empty
        propagation={
            "warmup_epochs": warmup,
            "every": 1,
            "dice_gate": 0.0,
            "roi_threshold": 1.0,
            "skip_one_class": False,  # every round keeps its pseudo class loss
        },
    )
    train(config, run, weak, strong, progress=False)
    rows = _history(run)
    start = max(warmup, roi_warmup)
    assert [int(r["step"]) for r in rows] == [STEPS * (e + 1) for e in range(4)]
    assert [r["phase"] for r in rows] == ["roi-warmup"] * roi_warmup + ["joint"] * (4 - roi_warmup)
    assert [int(r["propagated"]) for r in rows] == [0] * start + [1] * (4 - start)
    for r in rows[:start]:
        assert r["propagation_note"] == f"warm-up until epoch {start}"
        assert r["loss_pseudo_cls"] == "" and r["loss_pseudo_roi"] == ""
    empty = "every pseudo ROI mask is empty (no voxel above ζ = 1)"
    first = rows[start]["propagation_note"]
    assert first.startswith("started: Dice on ") and ">= gate 0" in first, first
    for r in rows[start:]:
        assert empty in r["propagation_note"]
        assert float(r["pseudo_mask_nonempty"]) == 0.0
        assert float(r["pseudo_mask_voxel_fraction"]) == 0.0
        assert r["loss_pseudo_cls"] != "" and r["loss_pseudo_roi"] != ""
    log = (run / "train.log").read_text(encoding="utf-8")
    assert log.count(empty) >= 4 - start
    assert f"epoch {start}: propagation started: Dice on" in log
    assert _ckpt(run, "last")["propagation_start"] == start


@pytest.mark.parametrize(("label", "skip"), [(0.0, False), (1.0, False), (0.0, True)])
def test_one_class_pseudo_labels_are_reported_and_optionally_skipped(
    label: float,
    skip: bool,
    tiny_data: Path,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A propagation whose kept pseudo class labels are all one class (here forced: the
    propagation returns ``label`` for every strong scan, one scan weighted 0) says so in
    ``history.csv`` and ``train.log``; with ``propagation.skip_one_class`` the round has
    no pseudo class loss, without it the loss is there."""
    calls: list[int] = []

    def one_class(p, cfg, *args):  # type: ignore[no-untyped-def]
        n = len(p)
        calls.append(n)
        targets = np.full(n, label, dtype=np.float32)
        targets[0] = 1.0 - label  # weight 0 below: not a kept label
        weights = np.ones(n, dtype=np.float32)
        weights[0] = 0.0
        return targets, weights

    monkeypatch.setattr(propagation, "pseudo_labels", one_class)
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "one"
    config = _mechanics(
        cache,
        "semi-supervised",
        2,
        propagation={"warmup_epochs": 1, "every": 1, "skip_one_class": skip},
    )
    train(config, run, weak, strong, progress=False)
    side = "positive" if label else "negative"
    note = f"every pseudo class label is {side} ({calls[0] - 1} strong scans)"
    rows = _history(run)
    assert calls and note not in rows[0]["propagation_note"]
    assert note in rows[1]["propagation_note"], rows[1]["propagation_note"]
    assert ("skipped" in rows[1]["propagation_note"]) is skip
    assert note in (run / "train.log").read_text(encoding="utf-8")
    assert int(rows[1]["propagated"]) == 1
    assert (rows[1]["loss_pseudo_cls"] == "") is skip


def test_pseudo_labels_of_both_classes_raise_no_one_class_note(
    tiny_data: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def both(p, cfg, *args):  # type: ignore[no-untyped-def]
        n = len(p)
        return (np.arange(n) % 2).astype(np.float32), np.ones(n, dtype=np.float32)

    monkeypatch.setattr(propagation, "pseudo_labels", both)
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "both"
    config = _mechanics(cache, "semi-supervised", 2, propagation={"warmup_epochs": 1, "every": 1})
    train(config, run, weak, strong, progress=False)
    assert all("every pseudo class label" not in r["propagation_note"] for r in _history(run))


def test_resumed_run_with_augmentation_and_patches_replays_the_full_run(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    weak, strong = _manifests(tiny_data)
    propagation = {"warmup_epochs": 1, "every": 1, "dice_gate": 0.0}
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def config(epochs: int) -> Config:
        return _mechanics(cache, "ssmdmt", epochs, propagation=propagation)

    train(config(3), full, weak, strong, progress=False)
    train(config(2), resumed, weak, strong, progress=False)
    train(config(3), resumed, weak, strong, resume=True, progress=False)
    assert _history(resumed) == _history(full)
    a, b = _ckpt(resumed, "last"), _ckpt(full, "last")
    assert _same_weights(a["model"], b["model"])
    assert _same_weights(a["ema"]["model"], b["ema"]["model"])
    assert a["steps_done"] == b["steps_done"] == 3 * STEPS
    assert a["propagation_start"] == b["propagation_start"] == 1
    assert _same_weights(_ckpt(resumed, "best")["model"], _ckpt(full, "best")["model"])


@pytest.mark.parametrize("norm", ["batch", "domain_batch"])
def test_attention_trains_with_whole_scan_roi_loss(
    norm: str, tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    """Attention pooling with the ROI loss on whole strong scans (no roi_patch): the
    forward already returns the strong scans' maps, which the trainer slices again."""
    weak, strong = _manifests(tiny_data)
    config = _mechanics(
        cache,
        "multitask",
        1,
        training={"roi_warmup_epochs": 0, "roi_patch": None},
        model={"norm": norm},
    )
    train(config, tmp_path / "run", weak, strong, progress=False)
    assert _history(tmp_path / "run")[0]["loss_roi"] != ""


def test_domain_batch_norm_with_roi_patches_is_refused_with_a_clear_error() -> None:
    """A second forward pass of strong patches cannot be routed by hospital (yet)."""
    with pytest.raises(ConfigError, match="domain_batch.*roi_patch"):
        load_config(
            overrides={"model": {"norm": "domain_batch"}, "training": {"roi_patch": [32, 32, 32]}}
        )


# -- evaluation.report.compare: parallel runs ------------------------------------------------


def test_compare_with_two_jobs_predicts_as_one_job(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    from lymphdx.workflows.compare import compare

    weak, strong = _manifests(tiny_data)
    config = _mechanics(
        cache,
        "supervised",
        2,
        training={"roi_warmup_epochs": 1, "num_threads": 1},
        evaluation={"bootstrap": 100},
    )
    strategies = ["supervised", "multitask"]
    for jobs in (1, 2):
        compare(config, weak, strong, tmp_path / f"jobs{jobs}", strategies, [0], False, jobs=jobs)
    for s in strategies:
        one = tmp_path / "jobs1" / "runs" / s / "seed0" / "predictions_test.csv"
        two = tmp_path / "jobs2" / "runs" / s / "seed0" / "predictions_test.csv"
        assert one.read_text() == two.read_text(), s


def test_too_short_for_propagation_warns_and_leaves_no_lock(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    """ssmdmt whose epochs end before its first possible propagation says so, and a
    finished run leaves no ``.lock`` behind."""
    weak, strong = _manifests(tiny_data)
    config = _mechanics(
        cache, "ssmdmt", 1, training={"roi_warmup_epochs": 1}, propagation={"warmup_epochs": 1}
    )
    train(config, tmp_path / "run", weak, strong, progress=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "never propagate" in log and "train as multitask" in log
    assert not (tmp_path / "run" / ".lock").exists()


def test_dice_gate_reads_all_strong_scans_at_each_due_epoch(
    tiny_data: Path,
    cache: Path,
    tmp_path: Path,
) -> None:
    """The gate reads the teacher's Dice on all strong training + validation scans
    (``strong_fit_dice``, scripted 0.2 then 0.5) at each due epoch from warmup_epochs on,
    not the validation split's: it waits at epoch 1 and opens at epoch 2; the readings are
    in the history, and the validation split's Dice plays no part."""
    from lymphdx.engine.trainer import Trainer

    script = iter([0.2, 0.5])
    calls: list[int] = []

    class Scripted(Trainer):
        def strong_fit_dice(self, model: object) -> tuple[float, int]:
            if len(calls) < 2:
                calls.append(self.epoch)
                return next(script), 9
            return super().strong_fit_dice(model)  # the end-of-training status

        def strong_val_dice(self, model: object) -> float:
            return 1.0  # would open the gate at once if it were read

    weak, strong = _manifests(tiny_data)
    run = tmp_path / "run"
    config = _mechanics(
        cache, "ssmdmt", 3, propagation={"warmup_epochs": 1, "every": 1, "dice_gate": 0.4}
    )
    train(config, run, weak, strong, progress=False, trainer=Scripted)
    assert calls == [1, 2]  # read while the gate is pending, from the first due epoch
    rows = _history(run)
    assert [int(r["propagated"]) for r in rows] == [0, 0, 1]
    assert [r["gate_dice"] for r in rows] == ["", "0.2", "0.5"]
    assert rows[1]["propagation_note"].startswith("waiting: Dice on 9 strong")
    assert rows[2]["propagation_note"].startswith(
        "started: Dice on 9 strong training + validation scans 0.500 >= gate 0.4"
    )
    status = json.loads((run / "roi_status.json").read_text())
    assert status["read_on"] == "strong training + validation scans" and status["n_scans"] > 9


@pytest.mark.parametrize("strategy", ["multitask", "supervised"])
def test_small_nodes_get_the_small_node_budget(
    tiny_data: Path, cache: Path, tmp_path: Path, strategy: str
) -> None:
    """The tiny data's nodes are small on the test grid (1.8 voxels: train.log says so), so
    with ``training.small_node_epochs`` a strategy with an ROI task trains that many
    epochs, and its ``config.yaml`` records them; a resume of the finished run with the
    original config adds nothing. ``supervised`` has no ROI task and keeps its budget."""
    weak, strong = _manifests(tiny_data)
    run = tmp_path / "small"
    config = _mechanics(cache, strategy, 1, training={"small_node_epochs": 3})
    train(config, run, weak, strong, progress=False)
    log = (run / "train.log").read_text(encoding="utf-8")
    saved = load_config(run / "config.yaml")
    if strategy == "supervised":
        assert len(_history(run)) == 1 and saved.training.epochs == 1
        assert "strong training set" not in log
        return
    assert "small for this grid" in log and "training 3 epochs instead of 1" in log
    assert len(_history(run)) == 3 and saved.training.epochs == 3
    train(config, run, weak, strong, resume=True, progress=False)
    assert len(_history(run)) == 3


def test_small_node_budget_is_off_by_default_and_never_shortens(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    weak, strong = _manifests(tiny_data)
    for name, training in (
        ("off", {"small_node_epochs": None}),
        ("less", {"small_node_epochs": 1}),
    ):
        run = tmp_path / name
        train(
            _mechanics(cache, "multitask", 2, training=training), run, weak, strong, progress=False
        )
        assert len(_history(run)) == 2, name
        assert "instead of" not in (run / "train.log").read_text(encoding="utf-8")


# -- training.lr_schedule ----------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "poly"])
def test_each_epochs_rate_is_the_schedules_worked_by_hand(
    schedule: str, tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    """history.csv's ``lr`` of each epoch: 1e-3 throughout, or nnU-Net's poly 1e-3 · (1 −
    e/4)^0.9 = 1e-3, 7.719e-4, 5.359e-4, 2.872e-4. A 2-epoch run trained on to 4 by
    ``--resume`` had the 2-epoch schedule (1e-3, 5.359e-4), then takes the 4-epoch one's."""
    weak, strong = _manifests(tiny_data)

    def config(epochs: int) -> Config:
        return _mechanics(
            cache, "multitask", epochs, training={"lr_schedule": schedule, "lr": 1e-3}
        )

    full, longer = tmp_path / "full", tmp_path / "longer"
    train(config(4), full, weak, strong, progress=False)
    hand = [1e-3] * 4 if schedule == "constant" else [1e-3, 7.719e-4, 5.359e-4, 2.872e-4]
    rates = [float(r["lr"]) for r in _history(full)]
    np.testing.assert_allclose(rates, hand, rtol=2e-4)
    train(config(2), longer, weak, strong, progress=False)
    train(config(4), longer, weak, strong, resume=True, progress=False)
    first = [1e-3] * 2 if schedule == "constant" else [1e-3, 5.359e-4]
    np.testing.assert_allclose(
        [float(r["lr"]) for r in _history(longer)], first + hand[2:], rtol=2e-4
    )
