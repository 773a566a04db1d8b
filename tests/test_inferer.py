"""The inferers (``evaluation.inferer``), the peak finder behind the classifier's bag of
tiles, and ``Classifier.bag``: whole is ``predict_with_tta`` bit for bit; sliding window
sees only tiles, blends them back exactly where they were cut, equals whole on a volume
of one tile, and reads the tiles at the map's separated peaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lymphdx.core.config import InferenceConfig, ModelConfig, load_config
from lymphdx.core.errors import ConfigError
from lymphdx.engine.candidates import peaks, tile_starts
from lymphdx.engine.inferer import SlidingWindowInferer, WholeInferer, make_inferer
from lymphdx.engine.teacher import predict_with_tta
from lymphdx.models.multitask import MultiTaskNet, build_model

SMALL = {"init_features": 4, "growth_rate": 4, "block_layers": [1, 1, 1], "bn_size": 2}
# the classifier variants a bag must reproduce (attention with every skip it can read)
VARIANTS = {
    "avgmax": {"pool": "avgmax"},
    "max": {"pool": "max"},
    "attention+skips": {
        "pool": "attention",
        "roi_evidence": "trained",
        "roi_evidence_topk": 3,
        "node_volume_evidence": 5,
        "malignancy_map": True,
    },
    "attention": {"pool": "attention", "roi_evidence": "detached"},
}


def _model(variant: str = "attention+skips", seed: int = 0) -> MultiTaskNet:
    """A small network (downsampling 8) in eval mode, with non-trivial batch-norm
    statistics and the skips' scalars away from their zero start."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**SMALL, **VARIANTS[variant]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        c = model.classifier
        for p in (c.evidence, c.volume_evidence):
            if p is not None:
                p.copy_(torch.tensor([0.03, -0.02]))
    return model.eval()


def _sliding(tile_xyz: tuple[int, int, int], **kw: object) -> SlidingWindowInferer:
    return SlidingWindowInferer(InferenceConfig(tile=tile_xyz, **kw))


# ----------------------------------------------------------------------------- config


def test_presets_load_unchanged_with_the_whole_inferer() -> None:
    for preset in ("quick", "paper"):
        config = load_config(preset=preset)
        assert config.evaluation.inferer == "whole"
        assert config.inference == InferenceConfig()
        assert isinstance(make_inferer(config), WholeInferer)
    config = load_config(overrides={"evaluation": {"inferer": "sliding_window"}})
    inferer = make_inferer(config)
    assert isinstance(inferer, SlidingWindowInferer) and inferer.tile == (64, 96, 96)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"inference": {"tile_size": [64, 64, 64]}}, ["inference.tile_size", "unknown"]),
        ({"inference": {"overlap": "much"}}, ["inference.overlap"]),
        ({"inference": {"overlap": 1.0}}, ["inference.overlap"]),
        ({"inference": {"tile_batch": 0}}, ["inference.tile_batch"]),
        ({"inference": {"blending": "linear"}}, ["inference.blending"]),
        ({"inference": {"bag_tiles": True}}, ["inference.bag_tiles"]),
        ({"inference": {"tile": [64, 64]}}, ["inference.tile"]),
        ({"evaluation": {"inferer": "tiles"}}, ["evaluation.inferer"]),
        (
            {"evaluation": {"inferer": "sliding_window"}, "inference": {"tile": [96, 96, 40]}},
            ["inference.tile", "divisible", "16"],
        ),
    ],
)
def test_bad_inference_settings_are_errors_naming_the_key(
    overrides: dict, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- whole


def test_whole_inferer_is_predict_with_tta_bit_for_bit() -> None:
    model = _model()
    x = torch.randn(2, 1, 16, 24, 32)
    for flips in (False, True):
        want = predict_with_tta(model, x, roi=True, flips=flips)
        got = WholeInferer()(model, x, roi=True, flips=flips)
        assert torch.equal(got["cls"], want["cls"]) and torch.equal(got["roi"], want["roi"])
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(WholeInferer()(model, x)["roi"], torch.sigmoid(plain["roi"]))
        pooled = (model.pooled(x) + model.pooled(x.flip(-1))) / 2
    assert torch.equal(WholeInferer().embed(model, x, flips=True), pooled)


# ----------------------------------------------------------------------------- the bag


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_whole_volume_as_one_tile_gives_forwards_logit(variant: str) -> None:
    model = _model(variant)
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        want = model(x, roi=False)["cls"]
        got = model.bag([model.tile_cells(x)])
        assert got.shape == (1,)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            model.classifier.bag_pooled([model.tile_cells(x)]), model.pooled(x), atol=1e-6, rtol=0
        )


def test_bag_pools_all_cells_of_all_tiles_together() -> None:
    """Two tiles of one scan: one softmax over all their cells (a hand computation in
    float64), the FC layers on the weighted mean and the largest attention logit; the
    same bag split across two calls of ``tile_cells`` (the tiles' order swapped) gives the
    same logit, and the whole bag twice over too."""
    model = _model("attention")
    tiles = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        cells = model.tile_cells(tiles)
        o = cells.cells.double().permute(1, 0, 2).reshape(cells.cells.shape[1], -1)  # (C, 2n)
        a = cells.attention.double().reshape(-1)  # (2n,)
        w = torch.exp(a - a.max())
        pooled = torch.cat([(o * w).sum(1) / w.sum(), a.max()[None]])[None]
        torch.testing.assert_close(
            model.classifier.bag_pooled([cells]).double(), pooled, atol=1e-6, rtol=0
        )
        c = model.classifier
        want = c.fc2(torch.relu(c.fc1(pooled.float()))).squeeze(1)
        want = want + 20.0 * (c.evidence[0] * pooled[0, -1].float() + c.evidence[1])
        got = model.bag([cells])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        split = model.bag([model.tile_cells(tiles[1:]), model.tile_cells(tiles[:1])])
        torch.testing.assert_close(split, got, atol=1e-6, rtol=0)
        twice = model.bag([cells, cells])
        torch.testing.assert_close(twice, got, atol=1e-6, rtol=0)
        # one tile alone is another bag
        assert not torch.allclose(model.bag([model.tile_cells(tiles[:1])]), got, atol=1e-4)


def test_pooling_without_attention_is_the_mean_and_max_over_all_cells() -> None:
    model = _model("avgmax")
    tiles = torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        o = model.embed(tiles)  # (3, C, 2, 2, 2)
        flat = o.permute(1, 0, 2, 3, 4).reshape(o.shape[1], -1)
        want = torch.cat([flat.mean(1), flat.amax(1)])[None]
        got = model.classifier.bag_pooled(
            [model.tile_cells(tiles[:2]), model.tile_cells(tiles[2:])]
        )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- peaks


def test_peaks_of_a_hand_made_map() -> None:
    prob = np.zeros((20, 30, 40), dtype=np.float32)
    prob[5, 5, 5] = 0.9
    prob[5, 5, 9] = 0.8  # 4 voxels from the first along x: inside its half tile
    prob[5, 5, 17] = 0.7  # 12 from the first, 8 from the 0.8: a peak of its own
    prob[15, 25, 35] = 0.6
    prob[10, 20, 20] = 0.5
    sep = (4, 6, 8)  # half a tile (d, h, w)
    assert peaks(prob, 2, sep) == [(5, 5, 5), (5, 5, 17)]
    assert peaks(prob, 3, sep) == [(5, 5, 5), (5, 5, 17), (15, 25, 35)]
    # K larger than the separated peaks: the four (the 0.8 lies too close), then the zero
    # background's voxels half a tile from every peak, until none is left
    many = peaks(prob, 500, sep)
    assert many[:4] == [(5, 5, 5), (5, 5, 17), (15, 25, 35), (10, 20, 20)]
    assert (5, 5, 9) not in many and 4 < len(many) < 500
    assert all(prob[p] == 0 for p in many[4:])
    pts = np.array(many)
    for i in range(len(pts)):
        for j in range(i):
            assert (np.abs(pts[i] - pts[j]) >= sep).any(), (many[i], many[j])
    # a peak is the maximum of the box of half a tile around it: a lower voxel 5 from a
    # higher one is none (as skimage.feature.peak_local_max), 8 away along x it is one
    prob[5, 5, 14] = 0.75
    assert peaks(prob, 2, sep) == [(5, 5, 5), (15, 25, 35)]
    # a separation of two voxels: the local maxima of the 26-neighbourhood
    assert peaks(prob, 3, (2, 2, 2)) == [(5, 5, 5), (5, 5, 9), (5, 5, 14)]


def test_peaks_break_ties_by_position_and_reject_bad_maps() -> None:
    prob = np.zeros((4, 4, 20), dtype=np.float32)
    prob[1, 1, 3] = prob[1, 1, 15] = prob[2, 2, 4] = 1.0  # equal heights
    # the first two of three equal peaks in C order, (2, 2, 4) too close to (1, 1, 3);
    # then the zero background's first voxel half a tile from both
    assert peaks(prob, 3, (2, 2, 3)) == [(1, 1, 3), (1, 1, 15), (0, 0, 0)]
    assert peaks(np.full((3, 3, 3), 0.5), 4, (8, 8, 8)) == [(0, 0, 0)]  # one plateau
    with pytest.raises(ValueError, match="NaN"):
        peaks(np.full((3, 3, 3), np.nan), 1, (1, 1, 1))
    with pytest.raises(ValueError, match="separation"):
        peaks(prob, 1, (0, 1, 1))


def test_tiles_are_moved_inside_the_scan_and_kept_once() -> None:
    tile, shape = (8, 8, 8), (20, 16, 8)
    starts = tile_starts([(10, 8, 4), (0, 0, 0), (19, 15, 7), (1, 1, 1)], tile, shape)
    assert starts == [(6, 4, 0), (0, 0, 0), (12, 8, 0)]  # (1, 1, 1) falls on (0, 0, 0)
    # a scan padded by 2 voxels before along z: its voxel 0 lies at 2
    assert tile_starts([(4, 4, 4)], tile, shape, offset=(2, 0, 0)) == [(2, 0, 0)]


# ----------------------------------------------------------------------------- sliding


class _Spy:
    """Records every input shape that reaches the model's encoder."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        model.encoder.register_forward_pre_hook(lambda _m, args: self.shapes.append(args[0].shape))


def test_the_model_only_ever_sees_tiles() -> None:
    model = _model()
    spy = _Spy(model)
    inferer = _sliding((16, 16, 8), tile_batch=3, bag_tiles=2)  # (x, y, z)
    x = torch.randn(2, 1, 20, 37, 45)  # larger than a tile, no multiple of it, 2 scans
    out = inferer(model, x, roi=True, flips=True)
    assert out["roi"].shape == x.shape and out["cls"].shape == (2,)
    assert out["roi"].device.type == "cpu"
    assert spy.shapes and {tuple(s[1:]) for s in spy.shapes} == {(1, 8, 16, 16)}
    assert max(s[0] for s in spy.shapes) == 3  # the tile batch
    assert 0 <= float(out["roi"].min()) and float(out["roi"].max()) <= 1
    assert model.training is False
    model.train()
    inferer.embed(model, x[:1], flips=False)
    assert model.training  # mode restored


def test_one_tile_equals_the_whole_volume() -> None:
    """A volume of exactly one tile, overlap 0, constant blending: the ROI map to 1e-5 and
    the classifier (a bag of that one tile) to 1e-6 of the whole-volume inferer's."""
    for variant in ("attention+skips", "avgmax"):
        model = _model(variant)
        x = torch.randn(2, 1, 16, 24, 32)
        inferer = _sliding((32, 24, 16), overlap=0.0, blending="constant", bag_tiles=3)
        for flips in (False, True):
            want = WholeInferer()(model, x, flips=flips)
            got = inferer(model, x, flips=flips)
            torch.testing.assert_close(got["roi"], want["roi"], atol=1e-5, rtol=0)
            torch.testing.assert_close(got["cls"], want["cls"], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            inferer.embed(model, x, flips=True),
            WholeInferer().embed(model, x, flips=True),
            atol=1e-6,
            rtol=0,
        )


class _Constant(nn.Module):
    """ROI logits equal to ``value`` everywhere, or (``identity``) to the input itself."""

    def __init__(self, value: float = 0.0, identity: bool = False) -> None:
        super().__init__()
        self.value, self.identity = value, identity
        self.anchor = nn.Parameter(torch.zeros(1))  # a device to run on

    def forward(self, x: torch.Tensor, roi: bool = True) -> dict[str, torch.Tensor]:
        out = x.clone() if self.identity else torch.full_like(x, self.value)
        return {"cls": x.mean(dim=(1, 2, 3, 4)), "roi": out}


@pytest.mark.parametrize("shape", [(1, 1, 40, 50, 61), (1, 1, 7, 50, 30)])
def test_gaussian_blending_weights_sum_to_one(shape: tuple[int, ...]) -> None:
    """A predictor of a constant logit gives that constant everywhere, and one that
    returns its input gives the scan back: every voxel is the weighted mean of the tiles
    that cover it, each tile put back where it was cut (padding included: the second scan
    is thinner than a tile)."""
    inferer = _sliding((24, 16, 16), overlap=0.5, blending="gaussian", sigma_scale=0.125)
    x = torch.randn(shape)
    for flips in (False, True):
        prob = inferer.roi_map(_Constant(1.5), x, flips)
        torch.testing.assert_close(
            prob, torch.full_like(x, float(torch.sigmoid(torch.tensor(1.5))))
        )
        prob = inferer.roi_map(_Constant(identity=True), x, flips)
        torch.testing.assert_close(prob, torch.sigmoid(x), atol=1e-6, rtol=0)


def test_the_bag_is_read_at_the_maps_peaks() -> None:
    """The tiles the classifier reads are centred on the blended map's peaks: a scan with
    one bright blob gives, with a model whose ROI map follows the image, a first tile
    around the blob."""
    inferer = _sliding((16, 16, 8), bag_tiles=2)
    x = torch.zeros(1, 1, 24, 48, 48)
    x[0, 0, 15, 30, 10] = 5.0
    prob = inferer.roi_map(_Constant(identity=True), x, flips=False)
    tiles = inferer.bag_tiles(x, prob[0, 0])
    assert tiles.shape == (2, 1, 8, 16, 16)
    assert float(tiles[0].max()) == 5.0 and tiles[0, 0, 4, 8, 8] == 5.0  # centred on it
    assert float(tiles[1].max()) < 5.0
