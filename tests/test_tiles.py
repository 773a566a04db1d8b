"""Tests of training on bags of tiles (``data.fit: whole``, ``training.sampler: tiles``):
where the tiles lie, the bag forward pass, and a run that trains, propagates, resumes and
is scored on scans of their own sizes while the network only ever sees tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lymphdx.core.config import load_config
from lymphdx.data.tile_sampler import bag_corners, body_box, crop_padded, tile_corner
from lymphdx.engine.train import train
from lymphdx.engine.trainer import Trainer
from lymphdx.models.multitask import build_model
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- placement


def test_tile_corner_inside_or_centred_when_the_scan_is_short() -> None:
    assert tile_corner((10, 10, 10), (8, 8, 8), (40, 40, 40)) == (6, 6, 6)
    assert tile_corner((1, 39, 20), (8, 8, 8), (40, 40, 40)) == (0, 32, 16)  # moved inside
    # an axis shorter than the tile: the scan centred, 3 voxels of padding before it
    assert tile_corner((2, 2, 2), (8, 8, 8), (3, 40, 40)) == (-2, 0, 0)


def test_crop_padded_matches_a_padded_array() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(5, 6, 7)).astype(np.float32)
    padded = np.pad(volume, 10, constant_values=-9.0)
    for corner in [(0, 0, 0), (-2, 1, 3), (3, -4, 2), (-1, -1, -1)]:
        got = crop_padded(volume, corner, (6, 4, 9), fill=-9.0)
        z, y, x = (c + 10 for c in corner)
        np.testing.assert_array_equal(got, padded[z : z + 6, y : y + 4, x : x + 9])


def test_body_box_and_bag_corners() -> None:
    array = np.full((20, 30, 40), -5.0, np.float32)
    array[4:9, 10:21, 5:36] = 1.0
    lo, hi = body_box(array, -5.0 + 1e-3)
    assert lo.tolist() == [4, 10, 5] and hi.tolist() == [8, 20, 35]
    rng = np.random.default_rng(1)
    centres = np.array([[10, 15, 20], [0, 0, 0]])
    corners = bag_corners(array.shape, (8, 8, 8), centres, 3, rng, (lo, hi))
    assert corners[:2] == [(6, 11, 16), (0, 0, 0)]  # the peaks first, clipped inside
    assert len(corners) == 5
    for z, y, x in corners[2:]:  # random tiles centred in the body box: centre - 4
        assert 0 <= z <= 4 and 6 <= y <= 16 and 1 <= x <= 31
    assert len(bag_corners(array.shape, (8, 8, 8), None, 0, rng)) == 1  # never empty


# --------------------------------------------------------------------------- the bag forward


@pytest.mark.parametrize("pool", ["attention", "avgmax"])
def test_bags_forward_is_the_per_scan_bag_and_the_tiles_maps(tmp_path: Path, pool: str) -> None:
    cfg = tiny_config(tmp_path, model={"pool": pool, "roi_evidence": "off"})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x = torch.randn(5, 1, 16, 16, 16)
    with torch.no_grad():
        out = model.bags(x, [2, 3])
        first = model.bag([model.tile_cells(x[:2])])
        second = model.bag([model.tile_cells(x[2:])])
        maps = model(x)["roi"]
    torch.testing.assert_close(out["cls"], torch.cat([first, second]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["roi"], maps, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="do not split"):
        model.bags(x, [2, 2])


# --------------------------------------------------------------------------- a run


def tiles_config(tmp_path: Path, strategy: str, **training: object):
    """Whole field of view at 10 x 10 x 15 mm (the tiny phantom: 32 x 32 x 16 voxels for the
    weak hospital, 34 x 34 x 15 for the strong one), sliding-window tiles of 32 x 32 x 16,
    bags of two peak tiles + one random tile of 16^3."""
    return tiny_config(
        tmp_path,
        strategy=strategy,
        data={"spacing": [10.0, 10.0, 15.0], "shape": None, "fit": "whole"},
        model={"pool": "attention", "roi_evidence": "trained"},
        training={
            "sampler": "tiles",
            "roi_patch": [16, 16, 16],
            "bag_random": 1,
            "bag_refresh_every": 1,
            "steps_per_epoch": 2,
            "epochs": 3,
            "roi_warmup_epochs": 1,
            "selection": "ema_last",
            **training,
        },
        evaluation={"inferer": "sliding_window", "bootstrap": 200},
        # the sliding window's tiles are larger than the bags' (inference.bag_tile)
        inference={"tile": [32, 32, 16], "bag_tile": [16, 16, 16], "bag_tiles": 2},
    )


class InputSpy(Trainer):
    """Records the spatial sizes of every training forward pass's inputs."""

    seen: list[tuple[int, ...]] = []

    def _losses(self, step, weak, strong, patches, sizes):
        for block in (weak, strong, patches):
            if block is not None:
                InputSpy.seen.append(tuple(block["image"].shape[2:]))
        return super()._losses(step, weak, strong, patches, sizes)


def test_config_needs_the_pieces_of_the_tile_path(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="training.sampler: tiles"):
        tiny_config(tmp_path, data={"shape": None, "fit": "whole"})
    with pytest.raises(Exception, match="evaluation.inferer: sliding_window"):
        tiny_config(tmp_path, training={"sampler": "tiles", "roi_patch": [16, 16, 16]})
    with pytest.raises(Exception, match="validates only some epochs"):
        tiny_config(tmp_path, training={"validate_every": 2})


def test_a_run_on_scans_of_their_own_size_sees_only_tiles(tmp_path: Path, tiny_data: Path) -> None:
    """ssmdmt on whole fields of view: bags refreshed after the ROI warm-up, pseudo masks
    of the scans' own sizes, and every forward pass of training on 16^3 inputs; the run is
    scored (sliding window) and predicts a new scan."""
    config = tiles_config(tmp_path, "ssmdmt")
    weak, strong = tiny_data / "weak/manifest.csv", tiny_data / "strong/manifest.csv"
    InputSpy.seen = []
    run = tmp_path / "run"
    train(config, run, weak, strong, progress=False, trainer=InputSpy)
    assert set(InputSpy.seen) == {(16, 16, 16)}
    rows = list(map(dict, __import__("csv").DictReader((run / "history.csv").open())))
    assert [r["phase"] for r in rows] == ["roi-warmup", "joint", "joint"]
    assert rows[0]["bag_peak_prob_weak"] == "" and rows[1]["bag_peak_prob_weak"] != ""
    assert rows[1]["bag_peak_prob_strong"] != ""  # ssmdmt reads strong scans as bags too
    assert float(rows[-1]["strong_val_dice"]) >= 0.0 and rows[-1]["val_auc"] != ""
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    centres = state["bags"]["centres"]["weak"]
    assert len(centres) == 22 and all(c.shape[1] == 3 for c in centres)
    # the pseudo masks of the last round live in RUN/pseudo/, named by the checkpoint
    store = state["pseudo"]["weak_store"]
    assert state["pseudo"]["weak_masks"] is None and store == "epoch_002"
    assert [p.name for p in (run / "pseudo").iterdir()] == [store]  # epoch 1's is gone
    # best.pt holds weights to score, not the masks (only --resume reads them, from last.pt)
    assert "pseudo" not in torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    masks = sorted((run / "pseudo" / store).glob("mask_*.npy"))
    assert len(masks) == 22 and np.load(masks[0]).shape == (16, 32, 32)

    from lymphdx.workflows.evaluate import evaluate_run
    from lymphdx.workflows.predict import predict

    metrics = evaluate_run(run, "test")
    assert 0.0 <= metrics["auc"] <= 1.0
    assert json.loads((run / "metrics.json").read_text())["inferer"] == "sliding_window"
    image = tiny_data / "weak/images/W0001.nii.gz"
    (result,) = predict(run, [image], tmp_path / "pred", progress=False)
    assert 0.0 <= result["probability"] <= 1.0 and result["inferer"] == "sliding_window"


def test_a_tile_run_resumes_where_it_stopped(tmp_path: Path, tiny_data: Path) -> None:
    """Two epochs then --resume to three give the weights of three in one go (the bags'
    peaks and the pseudo masks travel in the checkpoint)."""
    weak, strong = tiny_data / "weak/manifest.csv", tiny_data / "strong/manifest.csv"
    whole = tmp_path / "whole"
    train(tiles_config(tmp_path, "ssmdmt"), whole, weak, strong, progress=False)
    part = tmp_path / "part"
    train(tiles_config(tmp_path, "ssmdmt", epochs=2), part, weak, strong, progress=False)
    resumed = load_config(overrides={**tiles_config(tmp_path, "ssmdmt").model_dump(mode="json")})
    train(resumed, part, weak, strong, progress=False, resume=True)
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_the_bags_tiles_are_bag_tile_sized_and_centred_on_the_peaks(tmp_path: Path) -> None:
    """``inference.bag_tile`` smaller than the sliding window: the inferer cuts the bag's
    tiles at that size around the map's peaks, as ``BagSampler`` does in training."""
    from lymphdx.engine.inferer import SlidingWindowInferer

    config = tiles_config(tmp_path, "multitask")
    inferer = SlidingWindowInferer(config.inference)
    image = torch.arange(24 * 40 * 40, dtype=torch.float32).reshape(1, 1, 24, 40, 40)
    prob = torch.zeros(24, 40, 40)
    prob[12, 20, 30] = 0.9
    prob[3, 5, 5] = 0.5
    tiles = inferer.bag_tiles(image, prob)
    assert tuple(tiles.shape) == (2, 1, 16, 16, 16)
    # the first tile is centred on the highest peak: it starts 8 voxels before it
    torch.testing.assert_close(tiles[0, 0], image[0, 0, 4:20, 12:28, 22:38])
    corner = tile_corner((3, 5, 5), (16, 16, 16), (24, 40, 40))
    assert corner == (0, 0, 0)  # the training sampler places the second one alike
    torch.testing.assert_close(tiles[1, 0], image[0, 0, 0:16, 0:16, 0:16])


# ------------------------------------------------------------ per-stream augmentation


def test_bag_augmentation_overrides_only_the_keys_it_gives(tmp_path: Path) -> None:
    base = {"enabled": True, "noise_std": 0.2}
    cfg = tiny_config(tmp_path, training={"augmentation": base})
    assert cfg.training.bag_augmentation is None  # off: the tiles are augmented as patches
    cfg = tiny_config(
        tmp_path, training={"augmentation": base, "bag_augmentation": {"gamma_prob": 0.3}}
    )
    bag, patches = cfg.training.bag_augmentation, cfg.training.augmentation
    assert bag is not None and bag.gamma_prob == 0.3 and patches.gamma_prob == 0.0
    assert bag.model_dump() == {**patches.model_dump(), "gamma_prob": 0.3}
    with pytest.raises(Exception, match="gamma_range"):
        tiny_config(tmp_path, training={"bag_augmentation": {"gamma_range": [2.0, 1.0]}})


class AugmentSpy(Trainer):
    """Records the stream of every draw each of the two augmenters makes (key[3]: 0 weak
    scans, 1 strong scans, 2 ROI patches) and the gamma share of its settings."""

    streams: dict[str, set[int]] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        AugmentSpy.streams = {"patches": set(), "bags": set()}
        self.augmenter = self._spy("patches", self.augmenter)
        self.bag_augmenter = self._spy("bags", self.bag_augmenter)

    @staticmethod
    def _spy(name, augmenter):
        def augment(key, volumes):
            AugmentSpy.streams[name].add(key[3])
            AugmentSpy.streams.setdefault(f"{name}_gamma", set()).add(augmenter.cfg.gamma_prob)
            return augmenter(key, volumes)

        return augment


@pytest.mark.parametrize("strategy", ["multitask", "ssmdmt"])
def test_bags_tiles_take_bag_augmentation_and_patches_the_other(
    tmp_path: Path, tiny_data: Path, strategy: str
) -> None:
    """With ``training.bag_augmentation`` the weak (and, under ssmdmt, the strong) bags'
    tiles are drawn by its augmenter and the ROI patches by ``training.augmentation``'s."""
    config = tiles_config(
        tmp_path,
        strategy,
        epochs=2,
        roi_warmup_epochs=0,
        augmentation={"enabled": True},
        bag_augmentation={"gamma_prob": 1.0},
    )
    config.propagation.warmup_epochs = 1
    weak, strong = tiny_data / "weak/manifest.csv", tiny_data / "strong/manifest.csv"
    train(config, tmp_path / "run", weak, strong, progress=False, trainer=AugmentSpy)
    bags = {0, 1} if strategy == "ssmdmt" else {0}
    assert AugmentSpy.streams["bags"] == bags and AugmentSpy.streams["patches"] == {2}
    assert AugmentSpy.streams["bags_gamma"] == {1.0}
    assert AugmentSpy.streams["patches_gamma"] == {0.0}


class _Scans:
    """Two normalised scans of 32^3 voxels, as a ``VolumeSet`` hands them to the sampler."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.arrays = [rng.normal(size=(32, 32, 32)).astype(np.float32) for _ in range(2)]

    def __len__(self) -> int:
        return len(self.arrays)

    def image(self, i: int) -> np.ndarray:
        return self.arrays[i]


class _TileCounter(torch.nn.Module):
    """A model's ROI forward that counts the tiles it is handed."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.tiles = model, 0

    def forward(self, x: torch.Tensor, roi: bool = False) -> dict[str, torch.Tensor]:
        self.tiles += x.shape[0]
        return self.model(x, roi=roi)


@pytest.mark.parametrize(("overlap", "tiles"), [(None, 27), (0.0, 8), (0.5, 27)])
def test_refresh_reads_its_scans_with_its_own_overlap(
    tmp_path: Path, overlap: float | None, tiles: int
) -> None:
    """``training.bag_refresh_overlap``: a 32^3 scan in 16^3 tiles is 2 x 2 x 2 tiles
    without overlap and 3 x 3 x 3 at inference's 0.25 (MONAI's step: 12 voxels) or at 0.5;
    unset, the refresh reads as inference does."""
    from lymphdx.engine.bag_sampler import BagSampler

    config = tiles_config(tmp_path, "multitask", bag_refresh_overlap=overlap)
    config.inference.tile = (16, 16, 16)
    config.inference.overlap = 0.25
    torch.manual_seed(0)
    counter = _TileCounter(build_model(config.model))
    sampler = BagSampler(config)
    summary = sampler.refresh(counter, _Scans(), "weak", epoch=1)
    assert counter.tiles == 2 * tiles
    assert [len(c) for c in sampler.centres["weak"]] == [2, 2]  # inference.bag_tiles peaks
    assert 0.0 < summary["bag_peak_prob_weak"] < 1.0
