"""The paper's model (§3.2, Fig. 1): encoder f, classifier σ and ROI decoder g.

    o = f(v)        (B, C_o, D/s, H/s, W/s)   s = stem_stride · 2^(n_blocks-1)
    ỹ = σ(o)        (B,)                      one logit per scan
    s̃ = g(o)        (B, 1, D, H, W)           one logit per voxel

The paper preset maps a 512×512×256 (x, y, z) scan, i.e. a (B, 1, 256, 512, 512) tensor,
to a 16×16×8 embedding. The decoder mirrors the encoder: one dense block per encoder
block, 2× trilinear upsampling between them, optionally concatenating the encoder's
features of the same resolution (``decoder_skips``; the paper's g sees o only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from lymphdx.core.config import ModelConfig
from lymphdx.models.densenet3d import DenseBlock, LayerSpec, Transition, norm_spec
from lymphdx.models.domain_norm import convert_to_domain_bn


def _stage(enabled: bool, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, recomputed in backward instead of storing its insides when enabled
    (``checkpointing: block``)."""
    if enabled and torch.is_grad_enabled():
        return cp.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


ROI_PRIOR = 0.01  # initial ROI probability of every voxel
EVIDENCE_GAIN = 20.0  # speed-up of the classifier's ROI-evidence skip (Classifier)


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient times ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    return x.detach() if scale == 0.0 else x * scale + x.detach() * (1.0 - scale)


__all__ = [
    "DenseEncoder",
    "Classifier",
    "RoiDecoder",
    "MultiTaskNet",
    "TileCells",
    "build_model",
]


class DenseEncoder(nn.Module):
    """Stem conv (stride ``stem_stride``), dense blocks with transitions between them.

    Input ``(B, 1, D, H, W)``; returns the embedding ``o`` ``(B, C_o, D/s, H/s, W/s)`` and
    the features entering each transition (finest first), for optional decoder skips.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = norm_spec(cfg.norm)
        conv = Conv[Conv.CONV, 3]
        channels = cfg.init_features
        self.stage_checkpointing = cfg.checkpointing == "block"
        layer_ckpt = cfg.checkpointing != "off"
        k = 3 if cfg.stem_stride <= 2 else 5
        self.stem = nn.Sequential(
            conv(1, channels, kernel_size=k, stride=cfg.stem_stride, padding=k // 2, bias=False),
            get_norm_layer(norm, spatial_dims=3, channels=channels),
            get_act_layer(("relu", {"inplace": True})),
        )
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.level_channels: list[int] = []
        for i, n in enumerate(cfg.block_layers):
            spec = LayerSpec(cfg.growth_rate, cfg.bn_size, cfg.dropout, norm, layer_ckpt)
            block = DenseBlock(n, channels, spec)
            self.blocks.append(block)
            channels = block.out_channels
            self.level_channels.append(channels)
            if i < len(cfg.block_layers) - 1:
                self.transitions.append(Transition(3, channels, channels // 2, norm=norm))
                channels //= 2
        self.final = nn.Sequential(
            get_norm_layer(norm, spatial_dims=3, channels=channels),
            get_act_layer(("relu", {"inplace": True})),
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ckpt = self.stage_checkpointing
        x = _stage(ckpt, self.stem, x)
        skips = []
        for i, block in enumerate(self.blocks):
            x = _stage(ckpt, block, x)
            if i < len(self.transitions):
                skips.append(x)
                x = _stage(ckpt, self.transitions[i], x)
        return self.final(x), skips


class Classifier(nn.Module):
    """σ: pooling of ``o`` and two fully connected layers → one logit ``(B,)``.

    ``pool``: ``avg``, ``max`` or ``avgmax`` are the paper's global pooling. ``attention``
    is attention-MIL pooling (Ilse et al. 2018) whose attention is the ROI decoder's map:
    attention logits (``RoiDecoder``: the ROI logits, or with ``model.attention_head``
    the detached ROI logits plus a head that the scan label teaches), max-pooled onto the
    embedding's grid ``(B, 1, d, h, w)``, are softmaxed over the grid and weight ``o``'s
    cells; the FC layers see that weighted mean ``(B, C_o)`` and the scan's largest
    attention logit (its strongest node evidence). ``supervised`` learns the attention
    from scan labels alone; in the ROI strategies the other set's masks also teach it.
    ``roi_evidence`` (attention only): the logit also gets ``a · m + b`` with ``m`` that
    largest attention logit and ``a``, ``b`` learnt (both start at 0), a skip past the FC
    layers; ``detached`` keeps the label's gradient out of the decoder on this path.
    ``evidence_topk`` K > 1: ``m`` is instead the mean of the K largest attention logits
    on the decoder's grid (before the pooling onto the embedding's grid), a reading of
    the strongest evidence's extent rather than of one voxel.
    ``node_volume`` (attention only): the logit also gets ``c · v + d`` with ``v`` the
    scan's node volume evidence ``(B,)`` (``node_volume``), ``c``, ``d`` learnt from 0.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        pool: str,
        dropout: float = 0.0,
        downsampling: int = 1,
        roi_evidence: str = "off",
        node_volume: bool = False,
        evidence_topk: int = 1,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.roi_evidence = roi_evidence
        self.evidence_topk = evidence_topk
        # logit += EVIDENCE_GAIN · (scale · m + shift), m the largest attention logit: the
        # gain makes Adam move these two scalars EVIDENCE_GAIN times faster than the FC
        # weights (its steps are ~lr in the raw parameter), so that the calibration of the
        # decoder's logit to the scan label is learnt within the budget. Both start at 0:
        # started at scale 1, a decoder that finds nodes in every scan gives a first
        # classification loss of ~7 whose gradient wrecks the shared encoder
        self.evidence = nn.Parameter(torch.zeros(2)) if roi_evidence != "off" else None
        # the same for the node volume evidence (scale, shift), same gain and start
        self.volume_evidence = nn.Parameter(torch.zeros(2)) if node_volume else None
        self.downsampling = downsampling
        width = {"avgmax": 2 * in_channels, "attention": in_channels + 1}.get(pool, in_channels)
        self.fc1 = nn.Linear(width, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, 1)

    @property
    def attention(self) -> bool:
        """Whether pooling reads the ROI decoder's logits."""
        return self.pool == "attention"

    def attention_logits(self, roi_logits: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """ROI logits ``(B, 1, D, H, W)`` max-pooled onto the embedding's ``grid``
        ``(d, h, w)`` → ``(B, 1, d, h, w)``."""
        return F.adaptive_max_pool3d(roi_logits.float(), tuple(grid))

    def pooled(self, o: torch.Tensor, roi_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The pooling of ``o`` that the FC layers see: ``(B, C_o)``, ``(B, 2·C_o)``
        (avgmax) or ``(B, C_o + 1)`` (attention, which needs ``roi_logits``)."""
        if self.attention:
            if roi_logits is None:
                raise ValueError("attention pooling needs the ROI decoder's logits")
            a = self.attention_logits(roi_logits, tuple(o.shape[2:])).flatten(2)  # (B, 1, n)
            weights = torch.softmax(a, dim=-1).to(o.dtype)
            attended = (o.flatten(2) * weights).sum(dim=-1)  # (B, C_o)
            return torch.cat([attended, a.amax(dim=-1).to(o.dtype)], dim=1)
        pooled = []
        if self.pool in ("avg", "avgmax"):
            pooled.append(o.mean(dim=(2, 3, 4)))
        if self.pool in ("max", "avgmax"):
            pooled.append(o.amax(dim=(2, 3, 4)))
        return torch.cat(pooled, dim=1)

    def forward(
        self,
        o: torch.Tensor,
        roi_logits: torch.Tensor | None = None,
        volume: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logit ``(B,)`` of embeddings ``o`` ``(B, C_o, d, h, w)``, with the attention
        logits and the node volume evidence ``(B,)`` where the classifier reads them."""
        flat = None if roi_logits is None else roi_logits.float().flatten(1)  # (B, d'·h'·w')
        return self.head(self.pooled(o, roi_logits), flat, volume)

    def bag(self, tiles: Sequence[TileCells]) -> torch.Tensor:
        """The logit ``(1,)`` of one scan read as a bag of tiles (``MultiTaskNet.tile_cells``
        of its tiles): ``bag_pooled``, then the FC layers and the skips as ``forward``, the
        evidence read over all the tiles' attention logits. One whole volume as one tile
        gives ``forward``'s logit."""
        pooled = self.bag_pooled(tiles)
        flat = None if tiles[0].evidence is None else torch.cat([t.evidence for t in tiles])
        volume = None
        if self.volume_evidence is not None:
            if tiles[0].roi is None:
                raise ValueError("model.node_volume_evidence needs the tiles' ROI logits")
            k = tiles[0].node_volume_k
            volume = node_volume(torch.cat([t.roi.flatten() for t in tiles])[None], k)
        return self.head(pooled, None if flat is None else flat.flatten()[None], volume)

    def bag_pooled(self, tiles: Sequence[TileCells]) -> torch.Tensor:
        """What the FC layers see of one scan's bag of tiles, ``(1, width)``: ``pooled``
        over all the cells of all the tiles at once (attention: one softmax over them all,
        the weighted mean and the largest attention logit; avg/max: their mean/maximum)."""
        if not tiles:
            raise ValueError("a bag needs at least one tile")
        cells = torch.cat([t.cells.transpose(0, 1).flatten(1) for t in tiles], dim=1)[None]
        if self.attention:  # cells (1, C_o, N), attention logits (1, 1, N)
            if tiles[0].attention is None:
                raise ValueError("attention pooling needs the tiles' attention logits")
            a = torch.cat([t.attention.flatten() for t in tiles])[None, None]
            weights = torch.softmax(a, dim=-1).to(cells.dtype)
            attended = (cells * weights).sum(dim=-1)  # (1, C_o)
            return torch.cat([attended, a.amax(dim=-1).to(cells.dtype)], dim=1)
        pooled = []
        if self.pool in ("avg", "avgmax"):
            pooled.append(cells.mean(dim=-1))
        if self.pool in ("max", "avgmax"):
            pooled.append(cells.amax(dim=-1))
        return torch.cat(pooled, dim=1)

    def head(
        self,
        pooled: torch.Tensor,
        evidence_logits: torch.Tensor | None = None,
        volume: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logit ``(B,)`` of a pooling ``pooled`` ``(B, width)``: the two FC layers plus
        the skips (``roi_evidence`` reads the top-K mean of ``evidence_logits`` ``(B, n)``,
        the attention logits on the decoder's grid, when ``evidence_topk`` > 1; the node
        volume evidence ``volume`` ``(B,)``)."""
        h = F.relu(self.fc1(self.dropout(pooled)))
        logit = self.fc2(self.dropout(h)).squeeze(1)
        if self.evidence is not None:
            if self.evidence_topk > 1 and evidence_logits is not None:
                flat = evidence_logits
                m = flat.topk(min(self.evidence_topk, flat.shape[1]), dim=1).values.mean(1)
            else:
                m = pooled[:, -1].float()  # the scan's largest attention logit (B,)
            if self.roi_evidence == "detached":
                m = m.detach()
            scale, shift = (EVIDENCE_GAIN * self.evidence).unbind()
            logit = logit + (scale * m + shift).to(logit.dtype)
        if self.volume_evidence is not None:
            if volume is None:
                raise ValueError("model.node_volume_evidence needs the ROI decoder's map")
            scale, shift = (EVIDENCE_GAIN * self.volume_evidence).unbind()
            logit = logit + (scale * volume.float() + shift).to(logit.dtype)
        return logit


@dataclass
class TileCells:
    """T tiles of one scan as σ reads them (``MultiTaskNet.tile_cells``): ``cells``
    ``(T, C_o, n)`` the embedding's cells; with attention pooling ``attention`` ``(T, 1, n)``
    the attention logits max-pooled onto them, ``evidence`` ``(T, n')`` the attention
    logits on the decoder's grid (the ROI-evidence skip's top-K reads them) and, with
    ``model.node_volume_evidence`` = ``node_volume_k`` > 0, ``roi`` ``(T, d·h·w)`` the ROI
    logits; otherwise None."""

    cells: torch.Tensor
    attention: torch.Tensor | None = None
    evidence: torch.Tensor | None = None
    roi: torch.Tensor | None = None
    node_volume_k: int = 0

    def take(self, tiles: slice) -> TileCells:
        """These cells of the ``tiles`` (a slice along T) only."""

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[tiles]

        return TileCells(
            self.cells[tiles],
            part(self.attention),
            part(self.evidence),
            part(self.roi),
            self.node_volume_k,
        )


def node_volume(roi_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Node volume evidence ``(B,)`` of ROI logits ``(B, 1, D, H, W)``: the logit of the
    mean ROI probability over each scan's ``k`` most probable voxels (all of them when
    there are fewer), clamped to ±9.2 (p in [1e-4, 1 - 1e-4]). Detached: no gradient
    reaches the ROI map through it."""
    p = torch.sigmoid(roi_logits.detach().float()).flatten(1)
    top = p.topk(min(k, p.shape[1]), dim=1).values.mean(dim=1)
    return torch.logit(top, eps=1e-4)


class RoiDecoder(nn.Module):
    """g: dense blocks from the embedding back up to the input size.

    Input ``o`` ``(B, C_o, d, h, w)`` (and skips when enabled); output logits
    ``(B, 1, d·s, h·s, w·s)``. The last ``stem_stride`` factor is a trilinear upsampling
    of the logits, so no layer runs at full resolution (full-resolution layers would
    dominate the cost: BENCHMARKS.md §2.4).
    """

    def __init__(self, cfg: ModelConfig, encoder: DenseEncoder) -> None:
        super().__init__()
        norm = norm_spec(cfg.norm)
        conv = Conv[Conv.CONV, 3]
        layers = list(cfg.decoder_layers or cfg.block_layers)
        self.stage_checkpointing = cfg.checkpointing == "block"
        self.skips = cfg.decoder_skips
        self.stem_stride = cfg.stem_stride
        self.blocks = nn.ModuleList()
        self.reduce = nn.ModuleList()
        channels = encoder.out_channels
        # levels from coarsest to finest; level i (i>0) is preceded by a 2× upsampling.
        n = len(layers)
        for i in range(n):
            in_ch = channels
            if i > 0 and self.skips:
                in_ch += encoder.level_channels[n - 1 - i]
            width = max(cfg.growth_rate, encoder.level_channels[n - 1 - i] // 2)
            self.reduce.append(
                nn.Sequential(
                    get_norm_layer(norm, spatial_dims=3, channels=in_ch),
                    get_act_layer(("relu", {"inplace": True})),
                    conv(in_ch, width, kernel_size=1, bias=False),
                )
            )
            spec = LayerSpec(cfg.growth_rate, cfg.bn_size, 0.0, norm, cfg.checkpointing != "off")
            block = DenseBlock(layers[n - 1 - i], width, spec)
            self.blocks.append(block)
            channels = block.out_channels
        # output channels: the ROI map, and with model.malignancy_map the malignancy map
        self.maps = 2 if cfg.malignancy_map else 1
        self.malignancy_grad = cfg.malignancy_grad
        self.head = nn.Sequential(
            get_norm_layer(norm, spatial_dims=3, channels=channels),
            get_act_layer(("relu", {"inplace": True})),
            conv(channels, self.maps, kernel_size=1, bias=True),
        )
        # the classifier's attention: ROI logits (detached) + this head, zero at the start
        self.attention_head = (
            conv(channels, 1, kernel_size=1, bias=True)
            if cfg.pool == "attention" and cfg.attention_head
            else None
        )

    def forward(
        self,
        o: torch.Tensor,
        skips: list[torch.Tensor],
        out_size: tuple[int, int, int],
        attention: bool = False,
    ) -> Any:
        ckpt = self.stage_checkpointing
        x = o
        for i, (reduce, block) in enumerate(zip(self.reduce, self.blocks, strict=True)):
            if i == 0:
                x = _stage(ckpt, lambda t, r=reduce, b=block: b(r(t)), x)
            elif self.skips:
                x = _stage(ckpt, partial(self._level, reduce, block), x, skips[len(skips) - i])
            else:
                x = _stage(ckpt, partial(self._level, reduce, block), x)
        return _stage(ckpt, partial(self._output, out_size=tuple(out_size), attention=attention), x)

    @staticmethod
    def _level(
        reduce: nn.Module, block: nn.Module, x: torch.Tensor, *skip: torch.Tensor
    ) -> torch.Tensor:
        """2× upsampling, optional skip concatenation, 1×1 reduction, dense block."""
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return block(reduce(torch.cat([x, *skip], dim=1) if skip else x))

    def _output(
        self, x: torch.Tensor, out_size: tuple[int, int, int], attention: bool = False
    ) -> Any:
        """Map logits ``(B, M, *out_size)`` (M = 1: the ROI map; M = 2: ROI, malignancy);
        with ``attention`` the pair (map logits, attention logits on the last level's grid
        ``(B, 1, d', h', w')``): the last map there (the malignancy map when there is one,
        else the ROI map), plus ``attention_head`` (its own gradient only) when the model
        has one."""
        features = self.head[:-1](x)
        out = self.head[-1]
        if self.maps == 1 or self.malignancy_grad == 1.0:
            coarse = out(features)  # (B, M, d', h', w')
        else:  # the malignancy map's gradient into the shared features, scaled
            shared = scale_gradient(features, self.malignancy_grad)
            coarse = torch.cat(
                [
                    F.conv3d(features, out.weight[:1], out.bias[:1]),
                    F.conv3d(shared, out.weight[1:], out.bias[1:]),
                ],
                dim=1,
            )
        logits = coarse
        if tuple(logits.shape[2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=out_size, mode="trilinear", align_corners=False)
        if not attention:
            return logits
        if self.attention_head is None:
            return logits, coarse[:, -1:]
        return logits, coarse.detach() + self.attention_head(features)


class MultiTaskNet(nn.Module):
    """Encoder shared by the classifier and the ROI decoder.

    ``forward(x, roi=True)`` with ``x`` ``(B, 1, D, H, W)``, D/H/W divisible by the
    downsampling factor, returns ``{"cls": (B,), "roi": (B, 1, D, H, W)}`` (and
    ``"malignancy"`` ``(B, 1, D, H, W)`` with ``model.malignancy_map``); with
    ``roi=False`` no ROI map is returned and, unless the classifier's attention reads it,
    the decoder is not run; with a slice, only those batch items' maps are returned.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = DenseEncoder(cfg)
        self.classifier = Classifier(
            self.encoder.out_channels,
            cfg.classifier_hidden,
            cfg.pool,
            cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout,
            cfg.downsampling,
            cfg.roi_evidence,
            cfg.node_volume_evidence > 0,
            cfg.roi_evidence_topk,
        )
        self.decoder = RoiDecoder(cfg, self.encoder)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding ``o = f(v)``, ``(B, C_o, D/s, H/s, W/s)``."""
        return self.encoder(x)[0]

    def forward(self, x: torch.Tensor, roi: bool | slice = True) -> dict[str, torch.Tensor]:
        factor = self.cfg.downsampling
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"input size {tuple(x.shape[2:])} (D, H, W) is not divisible by the network's "
                f"downsampling factor {factor}"
            )
        o, skips = self.encoder(x)
        size = tuple(x.shape[2:])
        if self.classifier.attention:  # the classifier reads the whole batch's map
            maps, attention = self.decoder(o, skips, size, attention=True)
            k = self.cfg.node_volume_evidence
            volume = node_volume(maps[:, :1], k) if k else None
            out = {"cls": self.classifier(o, attention, volume)}
            if roi is not False:
                maps = maps if roi is True else maps[roi]
                out["roi"] = maps[:, :1]
                if maps.shape[1] > 1:
                    out["malignancy"] = maps[:, 1:]
            return out
        out = {"cls": self.classifier(o)}
        if roi is True:
            out["roi"] = self.decoder(o, skips, size)
        elif isinstance(roi, slice):  # decode only the scans that have an ROI target
            out["roi"] = self.decoder(o[roi], [s[roi] for s in skips], size)
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """What σ's fully connected layers see for images ``x`` ``(B, 1, D, H, W)``
        (``Classifier.pooled``)."""
        o, skips = self.encoder(x)
        attention = (
            self.decoder(o, skips, tuple(x.shape[2:]), attention=True)[1]
            if self.classifier.attention
            else None
        )
        return self.classifier.pooled(o, attention)

    def tile_cells(self, x: torch.Tensor) -> TileCells:
        """What σ reads of tiles ``x`` ``(T, 1, d, h, w)`` of one scan (``Classifier.bag``
        pools the cells of several such calls together): the embedding's cells and, with
        attention pooling, the attention logits (and the ROI logits for the node volume
        evidence)."""
        return self._tiles(x, decode=False)[0]

    def _tiles(self, x: torch.Tensor, decode: bool) -> tuple[TileCells, torch.Tensor | None]:
        """``tile_cells`` of ``x`` and, when the decoder ran (attention pooling, or
        ``decode``), its map logits ``(T, M, d, h, w)`` (M = 1, or 2 with the malignancy
        map); else None."""
        o, skips = self.encoder(x)
        cells = o.flatten(2)
        size = tuple(x.shape[2:])
        if not self.classifier.attention:
            return TileCells(cells), (self.decoder(o, skips, size) if decode else None)
        maps, attention = self.decoder(o, skips, size, attention=True)
        pooled = self.classifier.attention_logits(attention, tuple(o.shape[2:])).flatten(2)
        k = self.cfg.node_volume_evidence
        roi = maps[:, 0].flatten(1) if k else None
        return TileCells(cells, pooled, attention.float().flatten(1), roi, k), maps

    def bag(self, tiles: Sequence[TileCells]) -> torch.Tensor:
        """One scan's logit ``(1,)`` from the cells of its tiles (``Classifier.bag``)."""
        return self.classifier.bag(tiles)

    def bags(self, x: torch.Tensor, sizes: Sequence[int]) -> dict[str, torch.Tensor]:
        """Scans read as bags of tiles in one forward pass (``training.sampler: tiles``):
        ``x`` ``(N, 1, d, h, w)`` holds scan 0's ``sizes[0]`` tiles, then scan 1's, ...
        Returns ``{"cls": (len(sizes),)}`` (``Classifier.bag`` per scan) and the tiles'
        ``"roi"`` ``(N, 1, d, h, w)`` logits (and ``"malignancy"`` with that map)."""
        if sum(sizes) != len(x) or min(sizes, default=1) < 1:
            raise ValueError(f"bag sizes {list(sizes)} do not split {len(x)} tiles")
        cells, maps = self._tiles(x, decode=True)
        assert maps is not None
        logits, start = [], 0
        for n in sizes:
            logits.append(self.classifier.bag([cells.take(slice(start, start + n))]))
            start += n
        out = {"cls": torch.cat(logits), "roi": maps[:, :1]}
        if maps.shape[1] > 1:
            out["malignancy"] = maps[:, 1:]
        return out


def build_model(cfg: ModelConfig) -> MultiTaskNet:
    """The multi-task network of a config, Kaiming-initialised as in DenseNet.

    ``norm: domain_batch``: every batch norm becomes a ``DomainBatchNorm3d`` (weak = 0,
    strong = 1); route batches with ``domain_norm.domains`` (unrouted: domain 0).
    """
    model = MultiTaskNet(cfg)
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    # the ROI logits start at the prior of a rare foreground (Lin et al. 2017's focal-loss
    # init): from 0.5 everywhere the decoder first spends hundreds of steps learning
    # "background" and then sits there under Dice + CE
    # (docs/dev-log-2026-11-25_to_2026-12-03.md §7.1)
    nn.init.constant_(model.decoder.head[-1].bias, -math.log((1 - ROI_PRIOR) / ROI_PRIOR))
    if model.decoder.attention_head is not None:  # the attention starts as the ROI map
        nn.init.zeros_(model.decoder.attention_head.weight)
        nn.init.zeros_(model.decoder.attention_head.bias)
    if cfg.norm == "domain_batch":
        convert_to_domain_bn(model, n_domains=2)
    return model
