"""3-D DenseNet pieces: dense layer, dense block, transition (Huang et al. 2017).

Layers are built from MONAI's factories so norm/activation are parameters. The dense
layer is written here rather than taken from MONAI because it supports memory-efficient
activation checkpointing of its bottleneck (Pleiss et al. 2017): the concatenation,
norm, activation and 1×1 convolution are recomputed in the backward pass instead of
being stored, so the memory of a block grows linearly, not quadratically, with depth.
The transition is MONAI's (norm → ReLU → 1×1 conv → 2× average pooling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint as cp
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets.densenet import _Transition
from torch import nn

__all__ = ["DenseLayer", "DenseBlock", "LayerSpec", "Transition", "norm_spec"]

Transition = _Transition


def norm_spec(name: str, channels_hint: int = 8) -> str | tuple:
    """MONAI norm spec from a config name (``batch``, ``instance``, ``group``;
    ``domain_batch`` builds batch norms that ``build_model`` then makes domain-specific)."""
    if name == "domain_batch":
        return "batch"
    if name == "group":
        return ("group", {"num_groups": 4})
    if name == "instance":
        return ("instance", {"affine": True})
    return name


@dataclass(frozen=True)
class LayerSpec:
    """How every dense layer of a block is built.

    Args:
        growth_rate: channels a layer adds.
        bn_size: bottleneck width as a multiple of ``growth_rate``.
        dropout: dropout probability after the 3×3 conv.
        norm: MONAI norm spec.
        checkpointing: recompute the bottleneck in backward (saves memory, ~20% time).
    """

    growth_rate: int
    bn_size: int
    dropout: float = 0.0
    norm: str | tuple = "batch"
    checkpointing: bool = False


class DenseLayer(nn.Module):
    """norm → act → 1×1 conv (bn_size·growth) → norm → act → 3×3 conv (growth), on the
    concatenation of ``in_channels`` channels of earlier features (``spec``: the rest)."""

    def __init__(self, in_channels: int, spec: LayerSpec) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, 3]
        mid = spec.bn_size * spec.growth_rate
        self.norm1 = get_norm_layer(spec.norm, spatial_dims=3, channels=in_channels)
        self.act1 = get_act_layer(("relu", {"inplace": False}))
        self.conv1 = conv(in_channels, mid, kernel_size=1, bias=False)
        self.norm2 = get_norm_layer(spec.norm, spatial_dims=3, channels=mid)
        self.act2 = get_act_layer(("relu", {"inplace": True}))
        self.conv2 = conv(mid, spec.growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = nn.Dropout3d(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.checkpointing = spec.checkpointing

    def _bottleneck(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.act1(self.norm1(torch.cat(features, dim=1))))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: list of ``(B, C_i, D, H, W)``; returns ``(B, growth, D, H, W)``."""
        if (
            self.checkpointing
            and torch.is_grad_enabled()
            and any(f.requires_grad for f in features)
        ):
            out = cp.checkpoint(self._bottleneck, *features, use_reentrant=False)
        else:
            out = self._bottleneck(*features)
        return self.dropout(self.conv2(self.act2(self.norm2(out))))


class DenseBlock(nn.Module):
    """``num_layers`` dense layers built by ``spec``; output is the concatenation of input
    and all layers.

    Input ``(B, C, D, H, W)`` → output ``(B, C + num_layers·growth, D, H, W)``.
    """

    def __init__(self, num_layers: int, in_channels: int, spec: LayerSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * spec.growth_rate, spec) for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * spec.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, dim=1)
