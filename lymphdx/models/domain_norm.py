"""Domain-specific batch normalisation (DSBN; Chang et al., CVPR 2019).

The weak (hospital A, scan labels) and strong (hospital B, ROI masks) sets come from
different scanners and protocols, so one set of batch statistics is a compromise for
both. DSBN keeps one ``BatchNorm3d`` per domain and shares every other weight: each
batch item is normalised with the statistics (and, by default, the affine parameters)
of its own domain.

Routing does not change any forward signature: the ``domains`` context manager tells
every ``DomainBatchNorm3d`` of a model which batch item belongs to which domain::

    model = convert_to_domain_bn(build_model(cfg.model))
    ids = torch.tensor([0] * nw + [1] * ns)            # weak items first, then strong
    with domains(model, ids):
        out = model(images)                            # every DSBN splits by ``ids``
        loss(out).backward()                           # inside: see "checkpointing" below

Without routing every module uses domain 0 (the weak, labelled hospital); inference on a
scan picks its domain explicitly, ``with domains(model, 1): model(x)`` (an ``int`` routes
the whole batch, whatever its size).

A sub-network that sees only part of the batch (``MultiTaskNet``'s decoder with
``roi=slice(...)``) needs its own routing, given by nesting (the innermost wins)::

    with domains(model, ids), domains(model.decoder, ids[roi]):
        out = model(images, roi=roi)

Checkpointing (``model.checkpointing`` other than ``off``) recomputes the forward pass in
backward, reading the routing then: call ``backward()`` inside the ``with`` block.

Distributed training: a domain absent from a rank's batch gives its per-domain affine
parameters no gradient, so DDP needs ``find_unused_parameters=True`` (or
``shared_affine=True``, whose per-domain norms have no parameters). Do not apply
``SyncBatchNorm.convert_sync_batchnorm`` after conversion: a rank without items of a
domain would skip that domain's collective and the others would wait for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DomainBatchNorm3d", "domains", "convert_to_domain_bn"]


class DomainBatchNorm3d(nn.Module):
    """One ``BatchNorm3d`` per domain; input and output ``(B, C, D, H, W)``.

    Args:
        num_features: channels ``C``.
        n_domains: number of domains (weak = 0, strong = 1).
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm3d``.
        shared_affine: one affine (γ, β) for all domains instead of one per domain.
            DSBN (Chang et al.) uses per-domain affine parameters (the default, ``False``):
            a domain's γ, β then only learn from that domain's items. Shared affine
            normalises each domain separately but maps both to the same learnt scale and
            shift, which is safer when one domain has few items per batch.
        min_batch: in train mode, a domain with fewer items than this in a batch is
            normalised with that domain's running statistics (eval-mode BN) and does not
            update them: the statistics of a single scan are those of instance norm, not
            of the domain. Its affine parameters still receive gradients. ``1`` always
            uses batch statistics (fails, like BatchNorm, on a single value per channel).
    """

    def __init__(
        self,
        num_features: int,
        n_domains: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        shared_affine: bool = False,
        min_batch: int = 2,
    ) -> None:
        super().__init__()
        if n_domains < 1:
            raise ValueError(f"n_domains must be at least 1, got {n_domains}")
        self.num_features = num_features
        self.n_domains = n_domains
        self.shared_affine = shared_affine and affine
        self.min_batch = min_batch
        self.bns = nn.ModuleList(
            nn.BatchNorm3d(
                num_features,
                eps=eps,
                momentum=momentum,
                affine=affine and not self.shared_affine,
                track_running_stats=track_running_stats,
            )
            for _ in range(n_domains)
        )
        if self.shared_affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # routing: None (domain 0), an int (whole batch) or ids (B,) long; set by ``domains``
        self.routing: int | torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, n_domains={self.n_domains}, "
            f"shared_affine={self.shared_affine}, min_batch={self.min_batch}"
        )

    def _norm(self, domain: int, x: torch.Tensor) -> torch.Tensor:
        """Domain ``domain``'s BN on ``x`` ``(b, C, D, H, W)`` (all items of that domain)."""
        bn = self.bns[domain]
        use_running = (
            self.training
            and len(x) < self.min_batch
            and bn.running_mean is not None
            and bn.running_var is not None
        )
        if use_running:
            y = F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        else:
            y = bn(x)
        if self.shared_affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing is None:
            return self._norm(0, x)
        if isinstance(routing, int):
            return self._norm(routing, x)
        if len(routing) != len(x):
            raise ValueError(
                f"DomainBatchNorm3d: domain ids for {len(routing)} items but the batch has "
                f"{len(x)}; route a sub-network that sees part of the batch with a nested "
                "`domains(submodule, ids[part])`"
            )
        ids = routing.to(x.device)
        parts, order = [], []
        for d in range(self.n_domains):
            index = torch.nonzero(ids == d).squeeze(1)
            if len(index):
                parts.append(self._norm(d, x.index_select(0, index)))
                order.append(index)
        if len(parts) == 1:  # one domain only: already in batch order
            return parts[0]
        # scatter back: item order[k] is row k of the concatenation
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(parts).index_select(0, inverse)


def _check_ids(ids: int | torch.Tensor, n_domains: int) -> int | torch.Tensor:
    if isinstance(ids, int) and not isinstance(ids, bool):
        if not 0 <= ids < n_domains:
            raise ValueError(f"domain {ids} is outside 0..{n_domains - 1}")
        return ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
        raise ValueError("domain ids must be an int or an integer tensor of shape (B,)")
    ids = ids.detach().long()
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= n_domains):
        raise ValueError(f"domain ids must lie in 0..{n_domains - 1}, got {ids.tolist()}")
    return ids


@contextmanager
def domains(model: nn.Module, domain_ids: int | torch.Tensor) -> Iterator[nn.Module]:
    """Route batch items to domains in every ``DomainBatchNorm3d`` of ``model``.

    ``domain_ids``: ``(B,)`` integer tensor (item ``i`` → domain ``domain_ids[i]``) or an
    ``int`` for the whole batch. The previous routing of each module is restored on exit,
    so contexts nest (a sub-module's inner context overrides the outer one). A model
    without ``DomainBatchNorm3d`` is left alone. Yields ``model``.
    """
    modules = [m for m in model.modules() if isinstance(m, DomainBatchNorm3d)]
    if modules:
        domain_ids = _check_ids(domain_ids, min(m.n_domains for m in modules))
    previous = [m.routing for m in modules]
    try:
        for m in modules:
            m.routing = domain_ids
        yield model
    finally:
        for m, routing in zip(modules, previous, strict=True):
            m.routing = routing


def _from_bn(bn: nn.BatchNorm3d, n_domains: int, shared_affine: bool) -> DomainBatchNorm3d:
    dsbn = DomainBatchNorm3d(
        bn.num_features,
        n_domains,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        shared_affine=shared_affine,
    )
    ref = bn.weight if bn.weight is not None else bn.running_mean
    if ref is not None:
        dsbn.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for copy in dsbn.bns:
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(bn, name), getattr(copy, name)
                if src is not None and dst is not None:
                    dst.copy_(src)
        if dsbn.shared_affine:
            dsbn.weight.copy_(bn.weight)
            dsbn.bias.copy_(bn.bias)
    return dsbn.train(bn.training)


def convert_to_domain_bn(
    model: nn.Module, n_domains: int = 2, shared_affine: bool = False
) -> nn.Module:
    """Replace every ``nn.BatchNorm3d`` of ``model`` (in place) by a ``DomainBatchNorm3d``.

    Each domain copy starts from the original's affine parameters and running statistics,
    so in eval mode (and with any routing) the converted model computes what the original
    did until training separates the domains. Convert before building the optimiser (the
    parameters are new) and before wrapping in DDP. Returns ``model`` (or the new module
    when ``model`` itself is a ``BatchNorm3d``).
    """
    if isinstance(model, nn.BatchNorm3d):
        return _from_bn(model, n_domains, shared_affine)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(model, name, _from_bn(child, n_domains, shared_affine))
        elif not isinstance(child, DomainBatchNorm3d):
            convert_to_domain_bn(child, n_domains, shared_affine)
    return model
