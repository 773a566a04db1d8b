"""EMA teacher, flip TTA, SWA, domain-specific batch norm and masked pseudo-mask losses."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from lymphdx.core.config import load_config
from lymphdx.engine.losses import RoiLoss
from lymphdx.engine.pseudo_masks import (
    curriculum_keep,
    pseudo_mask_targets,
)
from lymphdx.engine.teacher import EmaTeacher, SwaAverager, predict_with_tta, update_bn
from lymphdx.models.domain_norm import DomainBatchNorm3d, convert_to_domain_bn, domains
from lymphdx.models.multitask import build_model

TINY = {
    "data": {"shape": [32, 32, 16]},
    "model": {
        "init_features": 8,
        "growth_rate": 4,
        "block_layers": [1, 1, 1, 1],
        "classifier_hidden": 8,
        "pool": "avgmax",  # the decoder sees only the sub-batch routed to it
        "roi_evidence": "off",
        "malignancy_map": False,
        "classifier_dropout": None,
    },
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids spinning threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **model: object) -> nn.Module:
    torch.manual_seed(seed)
    cfg = load_config(overrides={**TINY, "model": {**TINY["model"], **model}})
    return build_model(cfg.model)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 16, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomise_bn_stats(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ----------------------------------------------------------------------------- EMA teacher


def test_ema_decay_matches_hand_computation() -> None:
    student = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = EmaTeacher(student, decay=0.5)
    expected = 1.0
    for step, value in [(0, 3.0), (5, -2.0), (8, 7.0), (20, 0.5)]:
        with torch.no_grad():
            student.weight.fill_(value)
        d = min(0.5, (1 + step) / (10 + step))
        assert teacher.update(student, step) == pytest.approx(d)
        expected = d * expected + (1 - d) * value
        assert teacher.module.weight.item() == pytest.approx(expected, abs=1e-6)
    # hand values of d: 0.1, 0.4, 0.5 (cap), 0.5 (cap)
    assert [EmaTeacher.decay_at(s, 0.5) for s in (0, 5, 8, 20)] == pytest.approx(
        [0.1, 0.4, 0.5, 0.5]
    )
    assert teacher.updates == 4
    assert not teacher.module.weight.requires_grad
    assert student.weight.item() == 0.5  # the student is untouched


def test_ema_teacher_batch_norm_buffers_follow() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    teacher = EmaTeacher(student, decay=0.9)
    copier = EmaTeacher(student, decay=0.9, buffers="copy")
    old_mean = teacher.module[1].running_mean.clone()
    old_var = teacher.module[1].running_var.clone()
    student.train()
    for _ in range(3):
        student(torch.randn(4, 1, 3, 3, 3) * 2 + 1)
    bn = student[1]
    teacher.update(student, step=100)
    copier.update(student, step=100)
    t = teacher.module[1]
    torch.testing.assert_close(t.running_mean, 0.9 * old_mean + 0.1 * bn.running_mean)
    torch.testing.assert_close(t.running_var, 0.9 * old_var + 0.1 * bn.running_var)
    assert int(t.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    assert torch.equal(copier.module[1].running_mean, bn.running_mean)
    assert torch.equal(copier.module[1].running_var, bn.running_var)
    assert not teacher.module.training


def test_ema_teacher_state_dict_round_trip_and_lymphdx_model() -> None:
    student = tiny_model()
    teacher = EmaTeacher(student, decay=0.0)  # decay 0: the teacher is the student
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    teacher.update(student, step=0)
    x = images()
    student.eval()
    with torch.no_grad():
        a, b = student(x), teacher.module(x)
    torch.testing.assert_close(a["cls"], b["cls"])
    torch.testing.assert_close(a["roi"], b["roi"])
    other = EmaTeacher(tiny_model(seed=5), decay=0.7)
    other.load_state_dict(teacher.state_dict())
    assert other.updates == 1 and other.decay == 0.0
    for p, q in zip(other.module.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- TTA


class Symmetric(nn.Module):
    """cls invariant and roi equivariant under the left-right flip."""

    def forward(self, x: torch.Tensor, roi: bool = True) -> dict[str, torch.Tensor]:
        out = {"cls": x.mean(dim=(1, 2, 3, 4)) * 3}
        if roi:
            out["roi"] = x * 2 - 1
        return out


class Lopsided(nn.Module):
    """Neither: weights along the last axis and a shift."""

    def forward(self, x: torch.Tensor, roi: bool = True) -> dict[str, torch.Tensor]:
        ramp = torch.linspace(-1, 2, x.shape[-1])
        out = {"cls": (x * ramp).mean(dim=(1, 2, 3, 4))}
        if roi:
            out["roi"] = torch.roll(x, 1, dims=-1) * ramp
        return out


def test_tta_equals_plain_prediction_on_a_flip_symmetric_model() -> None:
    x = torch.randn(3, 1, 2, 3, 5)
    model = Symmetric()
    plain = model(x)
    tta = predict_with_tta(model, x, roi=True, flips=True)
    torch.testing.assert_close(tta["cls"], torch.sigmoid(plain["cls"]))
    torch.testing.assert_close(tta["roi"], torch.sigmoid(plain["roi"]))


def test_tta_is_the_hand_average_on_a_lopsided_model() -> None:
    x = torch.randn(3, 1, 2, 3, 5)
    model = Lopsided().train()
    a, b = model(x), model(torch.flip(x, dims=(-1,)))
    cls = (torch.sigmoid(a["cls"]) + torch.sigmoid(b["cls"])) / 2
    roi = (torch.sigmoid(a["roi"]) + torch.flip(torch.sigmoid(b["roi"]), dims=(-1,))) / 2
    tta = predict_with_tta(model, x, roi=True)
    torch.testing.assert_close(tta["cls"], cls)
    torch.testing.assert_close(tta["roi"], roi)
    assert not torch.allclose(tta["cls"], torch.sigmoid(a["cls"]))
    assert model.training  # mode restored
    no_flip = predict_with_tta(model, x, roi=False, flips=False)
    assert set(no_flip) == {"cls"}
    torch.testing.assert_close(no_flip["cls"], torch.sigmoid(a["cls"]))


def test_tta_on_lymphdx_model_shapes() -> None:
    model = tiny_model()
    out = predict_with_tta(model, images(2), roi=True)
    assert out["cls"].shape == (2,) and out["roi"].shape == (2, 1, 16, 32, 32)
    assert float(out["roi"].min()) >= 0 and float(out["roi"].max()) <= 1


# ----------------------------------------------------------------------------- SWA


def test_swa_uniform_average_and_update_bn() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    swa = SwaAverager(net)
    snapshots = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            net[0].weight.fill_(value)
        snapshots.append(net[0].weight.clone())
        swa.add(net)
    torch.testing.assert_close(swa.module[0].weight, torch.full_like(net[0].weight, 3.0))
    assert swa.count == 3
    restored = SwaAverager(net)
    restored.load_state_dict(swa.state_dict())
    assert restored.count == 3 and torch.equal(restored.module[0].weight, swa.module[0].weight)

    # update_bn: equal-weight average of the batch statistics, mode and momentum restored
    model = swa.module
    batches = [torch.randn(2, 1, 2, 2, 2) + k for k in range(3)]
    update_bn(model, batches)
    with torch.no_grad():
        means = [model[0](b).mean(dim=(0, 2, 3, 4)) for b in batches]
    torch.testing.assert_close(model[1].running_mean, torch.stack(means).mean(0))
    assert model[1].momentum == 0.1 and not model.training


def test_update_bn_fills_each_domain() -> None:
    torch.manual_seed(0)
    model = convert_to_domain_bn(nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    weak = [torch.randn(1, 1, 2, 3, 3) for _ in range(2)]  # single items: fallback is off
    strong = [torch.randn(2, 1, 2, 3, 3) + 5 for _ in range(2)]
    update_bn(model, [(b, 0) for b in weak] + [(b, 1) for b in strong])
    bns = model[1].bns
    torch.testing.assert_close(
        bns[0].running_mean, torch.stack([b.mean() for b in weak]).mean().expand(2)
    )
    torch.testing.assert_close(
        bns[1].running_mean, torch.stack([b.mean() for b in strong]).mean().expand(2)
    )
    assert model[1].min_batch == 2 and model[1].routing is None


# ----------------------------------------------------------------------------- DSBN


def two_domain_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 0, 1, 1, 0])
    x = torch.randn(6, 3, 4, 5, 5, generator=g)
    x[ids == 1] = x[ids == 1] * 4 + 10  # the other hospital: shifted and wider
    return x, ids


def per_domain_moments(y: torch.Tensor, ids: torch.Tensor, d: int) -> tuple:
    part = y[ids == d].transpose(0, 1).reshape(y.shape[1], -1)
    return part.mean(1), part.std(1, unbiased=False)


def test_dsbn_normalises_each_domain_where_shared_bn_does_not() -> None:
    x, ids = two_domain_batch()
    dsbn = DomainBatchNorm3d(3).train()
    with domains(dsbn, ids):
        y = dsbn(x)
    shared = nn.BatchNorm3d(3).train()(x)
    for d in (0, 1):
        mean, std = per_domain_moments(y, ids, d)
        torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(std, torch.ones(3), atol=1e-3, rtol=0)
        shared_mean, _ = per_domain_moments(shared, ids, d)
        assert shared_mean.abs().min() > 0.5
    # each domain's running statistics saw only its own items
    assert float(dsbn.bns[0].running_mean.abs().max()) < 0.05
    torch.testing.assert_close(dsbn.bns[1].running_mean, 0.1 * per_domain_moments(x, ids, 1)[0])


def test_dsbn_routing_by_index_is_exact() -> None:
    x, ids = two_domain_batch()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    dsbn = DomainBatchNorm3d(3).train()
    with domains(dsbn, ids):
        y = dsbn(x)
    with domains(dsbn, ids[perm]):
        y_perm = dsbn(x[perm])
    torch.testing.assert_close(y_perm, y[perm], atol=1e-6, rtol=1e-6)
    # eval mode: item i goes through domain ids[i]'s BN, bit for bit
    dsbn.eval()
    with torch.no_grad():
        dsbn.bns[1].running_mean.fill_(10.0)
        dsbn.bns[1].running_var.fill_(16.0)
        with domains(dsbn, ids):
            y = dsbn(x)
        for i in range(len(x)):
            assert torch.equal(y[i : i + 1], dsbn.bns[int(ids[i])](x[i : i + 1]))


def test_dsbn_single_item_domain_uses_running_stats() -> None:
    x, _ = two_domain_batch()
    ids = torch.tensor([0, 0, 0, 1, 0, 0])
    dsbn = DomainBatchNorm3d(3).train()
    with torch.no_grad():
        dsbn.bns[1].running_mean.fill_(2.0)
        dsbn.bns[1].running_var.fill_(9.0)
    with domains(dsbn, ids):
        y = dsbn(x)
    torch.testing.assert_close(y[3], (x[3] - 2.0) / torch.sqrt(torch.tensor(9.0 + 1e-5)))
    assert int(dsbn.bns[1].num_batches_tracked) == 0
    assert float(dsbn.bns[1].running_mean[0]) == 2.0
    assert int(dsbn.bns[0].num_batches_tracked) == 1
    dsbn.min_batch = 1  # batch statistics of the single item: instance-norm like
    with domains(dsbn, ids):
        y = dsbn(x)
    mean, _ = per_domain_moments(y, ids, 1)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)


def test_dsbn_default_int_and_nested_routing() -> None:
    x, ids = two_domain_batch()
    dsbn = DomainBatchNorm3d(3, n_domains=3).eval()
    with torch.no_grad():
        for d, bn in enumerate(dsbn.bns):
            bn.running_mean.fill_(float(d))
    net = nn.Sequential(dsbn)
    assert torch.equal(net(x), dsbn.bns[0](x))  # no routing: domain 0
    with domains(net, 2):
        assert torch.equal(net(x), dsbn.bns[2](x))
        with domains(dsbn, ids):
            assert torch.equal(net(x)[1], dsbn.bns[1](x)[1])
        assert dsbn.routing == 2  # inner context restored the outer routing
    assert dsbn.routing is None
    with domains(net, ids), pytest.raises(ValueError, match="nested"):
        net(x[:4])
    with pytest.raises(ValueError, match="0..2"):
        with domains(net, torch.tensor([0, 3])):
            pass
    with pytest.raises(ValueError, match="integer tensor"):
        with domains(net, torch.tensor([0.0, 1.0])):
            pass


def test_dsbn_shared_affine() -> None:
    x, ids = two_domain_batch()
    dsbn = DomainBatchNorm3d(3, shared_affine=True).train()
    assert all(bn.weight is None for bn in dsbn.bns)
    assert {n for n, _ in dsbn.named_parameters()} == {"weight", "bias"}
    with torch.no_grad():
        dsbn.weight.fill_(2.0)
        dsbn.bias.fill_(1.0)
    with domains(dsbn, ids):
        y = dsbn(x)
    mean, std = per_domain_moments(y, ids, 1)
    torch.testing.assert_close(mean, torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.full((3,), 2.0), atol=2e-3, rtol=0)
    (y * torch.randn_like(y)).sum().backward()
    assert dsbn.weight.grad is not None and dsbn.weight.grad.abs().sum() > 0


def test_convert_to_domain_bn_keeps_eval_outputs_and_trains() -> None:
    model = tiny_model()
    randomise_bn_stats(model)
    model.eval()
    x = images(2)
    with torch.no_grad():
        before = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    model = convert_to_domain_bn(model)
    dsbn = [m for m in model.modules() if isinstance(m, DomainBatchNorm3d)]
    assert len(dsbn) == n_bn and not model.training
    assert not any(
        isinstance(m, nn.BatchNorm3d)
        for m in model.modules()
        if m not in {bn for d in dsbn for bn in d.bns}
    )
    ids = torch.tensor([1, 0])
    with torch.no_grad():
        after_default = model(x)
        with domains(model, ids):
            after = model(x)
    for out in (after_default, after):
        torch.testing.assert_close(out["cls"], before["cls"])
        torch.testing.assert_close(out["roi"], before["roi"])

    # train mode, decoder on part of the batch: nested routing for the decoder
    model.train()
    x4 = images(4, seed=2)
    ids4 = torch.tensor([0, 0, 1, 1])
    part = slice(2, None)
    with domains(model, ids4), domains(model.decoder, ids4[part]):
        out = model(x4, roi=part)
        (out["cls"].sum() + out["roi"].mean()).backward()
    assert out["roi"].shape == (2, 1, 16, 32, 32)
    first = dsbn[0]
    assert int(first.bns[0].num_batches_tracked) == 1
    assert int(first.bns[1].num_batches_tracked) == 1
    assert first.bns[1].weight.grad is not None


# ----------------------------------------------------------------------------- pseudo masks


def roi_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 3, 4, 5, generator=g) * 2
    targets = (torch.rand(2, 1, 3, 4, 5, generator=g) > 0.7).float()
    return logits, targets


def test_roi_loss_with_all_ones_weights_equals_the_unweighted_loss() -> None:
    logits, targets = roi_batch()
    ones = torch.ones_like(logits)
    for ld, lc in [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)]:
        expected = RoiLoss(lambda_dice=ld, lambda_ce=lc)(logits, targets)
        got = RoiLoss(lambda_dice=ld, lambda_ce=lc)(logits, targets, ones)
        assert abs(float(got) - float(expected)) < 1e-6
    empty = torch.zeros_like(targets)  # a batch without any node
    assert abs(float(RoiLoss()(logits, empty, ones)) - float(RoiLoss()(logits, empty))) < 1e-6


def test_roi_loss_ignores_weighted_out_voxels() -> None:
    logits, targets = roi_batch(1)
    g = torch.Generator().manual_seed(5)
    weights = (torch.rand(logits.shape, generator=g) > 0.4).float()
    ignored = weights == 0
    a = logits.clone().requires_grad_(True)
    loss = RoiLoss()(a, targets, weights)
    loss.backward()
    assert a.grad is not None
    assert torch.all(a.grad[ignored] == 0) and a.grad[~ignored].abs().sum() > 0
    changed = logits.clone()
    changed[ignored] = torch.randn(int(ignored.sum()), generator=g) * 10
    assert torch.equal(RoiLoss()(changed, targets, weights), loss.detach())
    # weighting out a whole scan is the loss of the other scan alone
    only_first = torch.zeros_like(weights)
    only_first[0] = 1
    expected = RoiLoss()(logits[:1], targets[:1])
    assert abs(float(RoiLoss()(logits, targets, only_first)) - float(expected)) < 1e-6
    nothing = RoiLoss()(logits, targets, torch.zeros_like(weights))
    assert float(nothing) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        RoiLoss()(logits, targets, weights[:1])


def test_pseudo_mask_targets_hand_example() -> None:
    prob = np.array(
        [[[[0.25, 0.5, 0.625, 0.75, 0.875]]], [[[0.875, 0.125, 0.5, 0.75, 1.0]]]],
        dtype=np.float32,
    )  # (2, 1, 1, 5)
    targets, weights = pseudo_mask_targets(prob, zeta=0.75)
    assert targets.dtype == np.uint8 and weights.dtype == np.float32
    np.testing.assert_array_equal(targets[:, 0, 0], [[0, 0, 0, 0, 1], [1, 0, 0, 0, 1]])
    assert np.all(weights == 1)
    targets, weights = pseudo_mask_targets(prob, zeta=0.75, ignore_low=0.5)
    np.testing.assert_array_equal(targets[:, 0, 0], [[0, 0, 0, 0, 1], [1, 0, 0, 0, 1]])
    np.testing.assert_array_equal(weights[:, 0, 0], [[1, 0, 0, 0, 1], [1, 1, 0, 0, 1]])
    targets, weights = pseudo_mask_targets(
        prob, zeta=0.75, ignore_low=0.5, cls_prob=np.array([0.3, 0.9]), cls_gate=0.5
    )
    np.testing.assert_array_equal(weights[:, 0, 0], [[0, 0, 0, 0, 0], [1, 1, 0, 0, 1]])
    t, w = pseudo_mask_targets(
        torch.from_numpy(prob), 0.75, cls_prob=torch.tensor([0.5, 0.4]), cls_gate=0.5
    )
    assert t.dtype == torch.uint8 and w.dtype == torch.float32
    assert torch.all(w[0] == 1) and torch.all(w[1] == 0)  # 0.5 ≥ gate: kept
    with pytest.raises(ValueError, match="ignore_low"):
        pseudo_mask_targets(prob, zeta=0.5, ignore_low=0.6)
    with pytest.raises(ValueError, match="both"):
        pseudo_mask_targets(prob, zeta=0.5, cls_prob=np.array([0.1, 0.2]))


def test_curriculum_keep_hand_example() -> None:
    conf = np.array([0.9, 0.1, 0.5, 0.5, 0.7, 0.5, 0.3, 0.2, 0.8, 0.6])
    kept = [np.flatnonzero(curriculum_keep(conf, r)).tolist() for r in range(6)]
    assert kept[0] == [0, 8]  # 20 %
    assert kept[1] == [0, 4, 8, 9]  # 40 %
    assert kept[2] == [0, 2, 3, 4, 8, 9]  # 60 %: ties at 0.5 (2, 3, 5) by index
    assert kept[3] == [0, 2, 3, 4, 5, 6, 8, 9]  # 80 %
    assert kept[4] == kept[5] == list(range(10))  # capped at 100 %
    assert curriculum_keep(np.array([0.1, 0.9, 0.5]), 0).tolist() == [False, True, False]
    with_nan = curriculum_keep(np.array([np.nan, 0.0, 0.2]), 0, start=0.5)
    assert with_nan.tolist() == [False, True, True]
    t = curriculum_keep(torch.tensor([0.3, 0.3, 0.3, 0.3]), 1, start=0.25, step=0.25)
    assert t.dtype == torch.bool and t.tolist() == [True, True, False, False]
    assert curriculum_keep(np.zeros(0), 3).shape == (0,)


def test_teacher_made_inside_a_routing_context_forgets_it() -> None:
    x, ids = two_domain_batch()
    net = nn.Sequential(DomainBatchNorm3d(3))
    with domains(net, ids):
        teacher = EmaTeacher(net)
        swa = SwaAverager(net)
    assert teacher.module[0].routing is None and swa.module[0].routing is None
    assert teacher.module(x[:2]).shape == (2, 3, 4, 5, 5)
