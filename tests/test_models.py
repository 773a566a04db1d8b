"""Model shapes for both presets, routing of gradients, checkpointing equivalence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lymphdx.core.config import load_config
from lymphdx.models.multitask import build_model


def test_quick_preset_shapes() -> None:
    cfg = load_config(preset="quick")
    model = build_model(cfg.model)
    x_size, y_size, z_size = cfg.data.shape
    x = torch.randn(2, 1, z_size, y_size, x_size)
    out = model(x)
    assert out["cls"].shape == (2,)
    assert out["roi"].shape == (2, 1, z_size, y_size, x_size)
    o = model.embed(x)
    assert o.shape[2:] == (z_size // 16, y_size // 16, x_size // 16)


def test_paper_preset_maps_512_512_256_to_16_16_8_on_meta_device() -> None:
    cfg = load_config(preset="paper")
    assert tuple(cfg.data.shape) == (512, 512, 256)
    with torch.device("meta"):
        model = build_model(cfg.model)
        x = torch.empty(1, 1, 256, 512, 512)  # (B, 1, z, y, x): no memory is allocated
        o = model.embed(x)
        out = model(x)
    assert tuple(o.shape[2:]) == (8, 16, 16)  # (z, y, x) = 16 × 16 × 8 in (x, y, z)
    assert len(model.encoder.blocks) == 5 and len(model.decoder.blocks) == 5
    assert out["roi"].shape == (1, 1, 256, 512, 512)
    assert out["cls"].shape == (1,)
    # two fully connected layers in the classifier
    assert sum(isinstance(m, torch.nn.Linear) for m in model.classifier.modules()) == 2


def test_indivisible_input_is_refused() -> None:
    model = build_model(load_config().model)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 30, 48, 48))


def test_config_refuses_shape_not_divisible_by_downsampling() -> None:
    from lymphdx.core.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides={"data": {"shape": [50, 48, 32]}})


def test_without_roi_the_decoder_gets_no_gradient() -> None:
    model = build_model(
        load_config(
            overrides={"model": {"pool": "avgmax", "roi_evidence": "off", "malignancy_map": False}}
        ).model
    )
    out = model(torch.randn(2, 1, 32, 48, 48), roi=False)
    assert "roi" not in out
    out["cls"].sum().backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_attention_pooling_teaches_the_decoder_from_the_scan_label() -> None:
    model = build_model(load_config(overrides={"model": {"pool": "attention"}}).model)
    out = model(torch.randn(2, 1, 32, 48, 48), roi=False)
    assert "roi" not in out
    out["cls"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_checkpointing_matches_outputs_and_gradients() -> None:
    cfg = load_config(overrides={"model": {"classifier_dropout": 0.0}})  # deterministic
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt = build_model(cfg.model.model_copy(update={"checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 48, 48)
    grads = []
    for model in (plain, ckpt):
        out = model(x)
        (out["cls"].sum() + out["roi"].mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        outs = out
    torch.testing.assert_close(outs["cls"], plain(x)["cls"], rtol=1e-4, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_attention_head_keeps_the_label_gradient_off_the_roi_map() -> None:
    """``model.attention_head``: the attention starts as the ROI map (a zero head), and the
    scan label teaches the head, never the ROI map's own output convolution."""
    cfg = load_config(
        overrides={
            "model": {
                "pool": "attention",
                "attention_head": True,
                "malignancy_map": False,
                "classifier_dropout": 0,
            }
        }
    ).model
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 32, 48, 48)
    o, skips = model.encoder(x)
    roi, attention = model.decoder(o, skips, (32, 48, 48), attention=True)
    assert attention.shape[2:] == (16, 24, 24)
    pooled_roi = torch.nn.functional.interpolate(attention, size=(32, 48, 48), mode="trilinear")
    torch.testing.assert_close(pooled_roi, roi, rtol=1e-4, atol=1e-4)  # zero head: same map
    model.train()
    model(x, roi=False)["cls"].sum().backward()
    assert model.decoder.head[-1].weight.grad is None
    assert model.decoder.attention_head.weight.grad.abs().sum() > 0


def _evidence_model(mode: str, topk: int = 1) -> torch.nn.Module:
    model = {"pool": "attention", "roi_evidence": mode, "classifier_dropout": 0}
    cfg = load_config(overrides={"model": {**model, "roi_evidence_topk": topk}}).model
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_roi_evidence_adds_an_affine_term_of_the_largest_roi_logit() -> None:
    """logit = FC output + gain · (a · m + b), m the largest ROI logit on the embedding's
    grid, recomputed here from the decoder's own map."""
    from lymphdx.models.multitask import EVIDENCE_GAIN

    model = _evidence_model("trained")
    x = torch.randn(2, 1, 32, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.classifier.evidence, torch.zeros(2))  # starts switched off
        before = model(x, roi=False)["cls"]
        o, skips = model.encoder(x)
        _, coarse = model.decoder(o, skips, (32, 48, 48), attention=True)
        m = torch.nn.functional.adaptive_max_pool3d(coarse, o.shape[2:]).flatten(1).amax(1)
        model.classifier.evidence.copy_(torch.tensor([0.05, -0.1]))
        after = model(x, roi=False)["cls"]
    expected = EVIDENCE_GAIN * (0.05 * m - 0.1)
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-4)


def test_roi_evidence_topk_reads_the_mean_of_the_k_largest_decoder_logits() -> None:
    """With roi_evidence_topk K, m is the mean of the K largest logits of the map the
    attention reads, on the decoder's grid (not the embedding's), sorted here by NumPy."""
    from lymphdx.models.multitask import EVIDENCE_GAIN

    model = _evidence_model("trained", topk=4)
    x = torch.randn(2, 1, 32, 48, 48)
    with torch.no_grad():
        before = model(x, roi=False)["cls"]
        o, skips = model.encoder(x)
        _, coarse = model.decoder(o, skips, (32, 48, 48), attention=True)
        values = np.sort(coarse.flatten(1).numpy(), axis=1)[:, -4:]
        model.classifier.evidence.copy_(torch.tensor([0.05, -0.1]))
        after = model(x, roi=False)["cls"]
    expected = EVIDENCE_GAIN * (0.05 * torch.from_numpy(values.mean(1)) - 0.1)
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-4)
    assert coarse.shape[2:] == (16, 24, 24)  # the decoder's grid: the stem's stride only


@pytest.mark.parametrize("mode, reaches", [("detached", False), ("trained", True)])
def test_roi_evidence_gradient_reaches_the_decoder_only_when_trained(
    mode: str, reaches: bool
) -> None:
    """The evidence path's share of the decoder output conv's gradient: the gradient with
    the skip on minus the gradient with it at zero (the attention path gives the rest)."""
    x = torch.randn(2, 1, 32, 48, 48)
    grads = []
    for scale in (0.0, 0.5):
        model = _evidence_model(mode)
        with torch.no_grad():
            model.classifier.evidence.copy_(torch.tensor([scale, 0.0]))
        model(x, roi=False)["cls"].sum().backward()
        grads.append(model.decoder.head[-1].weight.grad.clone())
    assert (not torch.allclose(grads[0], grads[1])) is reaches


def test_roi_evidence_needs_attention_pooling() -> None:
    from lymphdx.core.errors import ConfigError

    with pytest.raises(ConfigError, match="roi_evidence.*pool: attention"):
        load_config(
            overrides={"model": {"pool": "avg", "roi_evidence": "trained", "malignancy_map": False}}
        )


def test_roi_evidence_reads_yaml_booleans(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A bare ``off`` in YAML is the boolean false: it means "off", not an error."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  pool: avgmax\n  roi_evidence: off\n  malignancy_map: false\n")
    assert load_config(path).model.roi_evidence == "off"


def _malignancy_model(grad: float = 1.0, **model: object) -> torch.nn.Module:
    """The malignancy-map model (``model`` overrides more keys), seeded, dropout off."""
    cfg = load_config(
        overrides={
            "model": {
                "pool": "attention",
                "malignancy_map": True,
                "malignancy_grad": grad,
                "roi_evidence": "trained",
                "classifier_dropout": 0,
                **model,
            }
        }
    ).model
    torch.manual_seed(0)
    return build_model(cfg)


def test_malignancy_map_is_what_the_classifier_reads() -> None:
    """``model.malignancy_map``: a second map of the input's size; the attention logits
    are that map's logits on the last level's grid (recomputed here from the full-size
    map by trilinear interpolation of the coarse grid), and the ROI map is the first."""
    model = _malignancy_model().eval()
    x = torch.randn(2, 1, 32, 48, 48)
    with torch.no_grad():
        out = model(x)
        assert out["roi"].shape == out["malignancy"].shape == (2, 1, 32, 48, 48)
        assert not torch.allclose(out["roi"], out["malignancy"])
        o, skips = model.encoder(x)
        maps, attention = model.decoder(o, skips, (32, 48, 48), attention=True)
        up = torch.nn.functional.interpolate(attention, size=(32, 48, 48), mode="trilinear")
        torch.testing.assert_close(up, out["malignancy"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(maps[:, :1], out["roi"])
        assert model(x, roi=slice(1, None))["malignancy"].shape[0] == 1
        assert "malignancy" not in model(x, roi=False)


def test_malignancy_map_keeps_the_label_gradient_off_the_roi_output() -> None:
    """The scan label reaches the malignancy map's output weights, never the ROI map's;
    the ROI loss through ``maps_and_targets`` reaches both."""
    from lymphdx.engine.losses import RoiLoss
    from lymphdx.engine.steps import maps_and_targets

    model = _malignancy_model().train()
    with torch.no_grad():
        model.classifier.evidence.copy_(torch.tensor([0.05, 0.0]))  # the skip switched on
    x = torch.randn(2, 1, 32, 48, 48)
    model(x, roi=False)["cls"].sum().backward()
    grad = model.decoder.head[-1].weight.grad
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0
    model.zero_grad()
    masks = (torch.rand(2, 1, 32, 48, 48) > 0.9).to(torch.uint8)
    logits, targets, n = maps_and_targets(model(x), "", slice(None), masks)
    assert n == 2 and logits.shape == targets.shape == (4, 1, 32, 48, 48)
    assert torch.equal(targets[2:], masks)
    RoiLoss()(logits, targets).backward()
    grad = model.decoder.head[-1].weight.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


@pytest.mark.parametrize(
    "model_cfg, match",
    [
        (
            {"pool": "avgmax", "roi_evidence": "off", "malignancy_map": True},
            "malignancy_map.*pool: attention",
        ),
        (
            {"pool": "attention", "malignancy_map": True, "attention_head": True},
            "malignancy_map and model.attention_head",
        ),
    ],
)
def test_malignancy_map_config_is_checked(model_cfg: dict, match: str) -> None:
    from lymphdx.core.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(overrides={"model": model_cfg})


@pytest.mark.parametrize("grad", [0.0, 0.5])
def test_malignancy_grad_scales_the_label_gradient_into_the_decoder(grad: float) -> None:
    """``model.malignancy_grad``: the same forward pass; the scan label's gradient into
    the decoder's blocks is that of ``malignancy_grad: 1`` times the scale (none at 0),
    while the malignancy map's own output layer gets all of it."""
    x = torch.randn(2, 1, 32, 48, 48)
    grads, outs = [], []
    for g in (1.0, grad):
        model = _malignancy_model(g).train()
        with torch.no_grad():
            model.classifier.evidence.copy_(torch.tensor([0.05, 0.0]))
        torch.manual_seed(1)  # the same dropout draws, if any
        out = model(x, roi=False)["cls"]
        out.sum().backward()
        outs.append(out.detach())
        block = next(model.decoder.blocks[-1].parameters())
        grads.append((block.grad.clone(), model.decoder.head[-1].weight.grad[1].clone()))
    torch.testing.assert_close(outs[0], outs[1])
    (block_full, head_full), (block_scaled, head_scaled) = grads
    torch.testing.assert_close(head_scaled, head_full)
    # the decoder's gradient from the label comes through the malignancy map only
    torch.testing.assert_close(block_scaled, grad * block_full, rtol=1e-4, atol=1e-8)


def test_node_volume_is_the_logit_of_the_top_k_mean_probability() -> None:
    """A hand-worked example: probabilities 0.9, 0.8, 0.5 and the rest 0.01; with k = 2
    the evidence is logit(0.85), with k = 3 logit(0.7333…), and more voxels than the scan
    has take them all."""
    from lymphdx.models.multitask import node_volume

    p = torch.full((1, 1, 2, 2, 2), 0.01)
    p[0, 0, 0, 0, 0], p[0, 0, 1, 1, 1], p[0, 0, 0, 1, 0] = 0.9, 0.8, 0.5
    logits = torch.log(p / (1 - p))
    for k, mean in ((2, 0.85), (3, 2.2 / 3), (100, (2.2 + 5 * 0.01) / 8)):
        expected = torch.tensor([math.log(mean / (1 - mean))])
        torch.testing.assert_close(node_volume(logits, k), expected, rtol=1e-5, atol=1e-5)


def _volume_model(k: int = 20) -> torch.nn.Module:
    return _malignancy_model(0.1, node_volume_evidence=k)


def test_node_volume_evidence_adds_an_affine_term_of_the_roi_maps_top_k() -> None:
    """logit = the rest + gain · (c · v + d), with v recomputed here with numpy from the
    model's own ROI map (its 20 largest probabilities), and c = d = 0 at the start."""
    from lymphdx.models.multitask import EVIDENCE_GAIN

    model = _volume_model().eval()
    x = torch.randn(2, 1, 32, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.classifier.volume_evidence, torch.zeros(2))
        first = model(x)
        model.classifier.volume_evidence.copy_(torch.tensor([0.05, -0.1]))
        after = model(x)["cls"]
    probs = torch.sigmoid(first["roi"]).flatten(1).double().numpy()
    top = np.sort(probs, axis=1)[:, -20:].mean(axis=1)
    v = torch.from_numpy(np.log(top / (1 - top))).float()
    torch.testing.assert_close(
        after - first["cls"], EVIDENCE_GAIN * (0.05 * v - 0.1), rtol=1e-4, atol=1e-4
    )


def test_node_volume_evidence_sends_no_gradient_into_the_decoder() -> None:
    """The decoder's gradient is the same with the term's scale at 0 and at 0.5, while
    the scale itself learns."""
    x = torch.randn(2, 1, 32, 48, 48)
    grads = []
    for scale in (0.0, 0.5):
        model = _volume_model()
        with torch.no_grad():
            model.classifier.volume_evidence.copy_(torch.tensor([scale, 0.0]))
        model(x, roi=False)["cls"].sum().backward()
        grads.append(model.decoder.head[-1].weight.grad.clone())
        assert model.classifier.volume_evidence.grad[0].abs() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_node_volume_evidence_needs_attention_pooling() -> None:
    from lymphdx.core.errors import ConfigError

    with pytest.raises(ConfigError, match="node_volume_evidence.*pool: attention"):
        load_config(
            overrides={
                "model": {
                    "pool": "avgmax",
                    "roi_evidence": "off",
                    "malignancy_map": False,
                    "node_volume_evidence": 20,
                }
            }
        )
