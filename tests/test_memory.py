"""Memory: the traced peak estimate, checkpointing modes, and the memory guard."""

from __future__ import annotations

import pytest
import torch

from lymphdx.core.config import load_config
from lymphdx.core.errors import LymphdxError
from lymphdx.engine.memory import PeakTracker, check_memory, estimate_step_memory
from lymphdx.models.multitask import build_model


def test_peak_tracker_follows_storages_by_hand() -> None:
    with PeakTracker() as t:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        b = torch.empty(1000, device="meta")  # 8000 live
        view = a[:10]  # a view shares a's storage: no new bytes
        del a
        assert t.live == 8000  # the view keeps a's storage alive
        del view
        c = torch.empty(500, dtype=torch.float64, device="meta")  # 4000 + 4000
        assert t.live == 8000
        d = b + 1  # an op's output: 4000 more
    assert t.peak == 12000
    del b, c, d


@pytest.mark.parametrize("mode", ["bottleneck", "block"])
def test_checkpointing_modes_match_outputs_and_gradients(mode: str) -> None:
    cfg = load_config(overrides={"model": {"decoder_skips": True, "classifier_dropout": 0.0}})
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt = build_model(cfg.model.model_copy(update={"checkpointing": mode}))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 48, 48)
    outs, grads = [], []
    for model in (plain, ckpt):
        out = model(x)
        (out["cls"].sum() + out["roi"].mean()).backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[0]["roi"], outs[1]["roi"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0]["cls"], outs[1]["cls"], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointing_lowers_the_peak_at_the_paper_size() -> None:
    """Traced (meta device) training step of one 512×512×256 volume, each mode."""
    cfg = load_config(preset="paper").model
    peaks = {
        mode: estimate_step_memory(
            cfg.model_copy(update={"checkpointing": mode}), (256, 512, 512), 1
        ).traced_bytes
        for mode in ("off", "bottleneck", "block")
    }
    assert peaks["bottleneck"] < 0.85 * peaks["off"]
    assert peaks["block"] < 0.55 * peaks["off"]
    # inference keeps no activations for backward: far below any training step
    infer = estimate_step_memory(cfg, (256, 512, 512), 1, train=False).traced_bytes
    assert infer < 0.5 * peaks["block"]


def test_traced_peak_matches_a_hand_count_for_a_conv() -> None:
    """One 3×3×3 conv, no bias, 1→4 channels on a 16³ input, eval, no grad."""
    from lymphdx.engine.memory import PeakTracker

    with torch.device("meta"):
        conv = torch.nn.Conv3d(1, 4, 3, padding=1, bias=False)
    with PeakTracker() as t, torch.no_grad():
        x = torch.empty(1, 1, 16, 16, 16, device="meta")
        y = conv(x)
    assert t.peak >= (16**3 + 4 * 16**3) * 4  # input and output live together
    assert t.peak <= (16**3 + 4 * 16**3) * 4 * 2  # and not much else
    del y


def test_memory_guard_refuses_with_the_estimate_and_the_fix() -> None:
    cfg = load_config(preset="paper", overrides={"model": {"checkpointing": "off"}})
    with pytest.raises(LymphdxError) as err:
        check_memory(cfg, available=8 << 30)
    msg = str(err.value)
    assert "512, 512, 256" in msg and "GiB" in msg and "8.0 GiB is available" in msg
    assert "model.checkpointing: block" in msg and "batch_size" in msg
    # the quick preset fits easily
    est = check_memory(load_config(preset="quick"), available=8 << 30)
    assert est.rss_bytes < 2 << 30
