"""How a scan is scored: the named inferers that ``evaluation.inferer`` picks.

Every caller that scores a scan (``predict_volumes``, propagation, strong-validation Dice,
detection, ``evaluate``) asks the run's inferer (``make_inferer(config)``) and none calls
the model directly, so that the whole-volume network of the quick and paper presets and
the tiled one of real-size scans are scored the same way.

* ``WholeInferer`` (``whole``): the whole volume in one forward pass, batched, the flip
  averaged in (``teacher.predict_with_tta``): today's numbers, bit for bit.
* ``SlidingWindowInferer`` (``sliding_window``): the ROI map of a scan of any size from
  tiles of ``inference.tile`` (MONAI ``sliding_window_inference``: overlap, Gaussian
  blending, a batch of tiles per forward pass), the scan-sized map kept on the CPU while
  the tiles run on the model's device; the classifier reads the bag of the tiles centred
  on the map's highest separated peaks (``engine.candidates``, ``Classifier.bag``). Peak
  memory is set by the tile and the tile batch plus a few float32 maps of the scan.

Both: ``inferer(model, images, roi, flips)`` → ``{"cls": (B,), "roi": (B, 1, D, H, W)}``
sigmoid probabilities; ``inferer.embed(model, images, flips)`` → what σ's FC layers see,
``(B, width)``. The model runs in eval mode (restored after); a model with domain-specific
batch norm uses the routing of the caller's ``domains`` context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from lymphdx.core.config import Config, InferenceConfig
from lymphdx.engine.candidates import peaks, tile_starts
from lymphdx.engine.teacher import predict_with_tta
from lymphdx.models.multitask import TileCells

__all__ = ["Inferer", "WholeInferer", "SlidingWindowInferer", "make_inferer", "pad_to_tile"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _flip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


def pad_to_tile(image: torch.Tensor, tile: tuple[int, int, int]) -> tuple[torch.Tensor, list[int]]:
    """``image`` ``(1, 1, D, H, W)`` padded with 0 (the normalised mean) to at least
    ``tile`` ``(d, h, w)`` as MONAI's sliding window pads it (half before, the rest after),
    and the padding before each axis ``[z, y, x]``."""
    pad, offset = [], []
    for size, t in zip(reversed(image.shape[2:]), reversed(tile), strict=True):
        diff = max(t - size, 0)
        pad += [diff // 2, diff - diff // 2]
        offset.insert(0, diff // 2)
    return (F.pad(image, pad, value=0.0) if any(pad) else image), offset


class Inferer(ABC):
    """Scores scans ``(B, 1, D, H, W)`` with a ``MultiTaskNet``-like model."""

    name: str

    @abstractmethod
    def batch_size(self, requested: int) -> int:
        """How many scans to pass per call when a caller would batch ``requested``."""

    @abstractmethod
    def __call__(
        self, model: nn.Module, images: torch.Tensor, roi: bool = True, flips: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"cls": (B,)}`` and, with ``roi``, ``"roi"`` ``(B, 1, D, H, W)``: sigmoid
        probabilities, averaged with the left-right flip's (the map flipped back) when
        ``flips``."""

    @abstractmethod
    def embed(self, model: nn.Module, images: torch.Tensor, flips: bool = False) -> torch.Tensor:
        """What σ's fully connected layers see, ``(B, width)`` float32, averaged with the
        left-right flip's when ``flips``."""


class WholeInferer(Inferer):
    """The whole volume in one forward pass (the quick and paper presets): a batch of
    same-shape scans at once, ``predict_with_tta``. Results lie on the model's device."""

    name = "whole"

    def batch_size(self, requested: int) -> int:
        return requested

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, images: torch.Tensor, roi: bool = True, flips: bool = False
    ) -> dict[str, torch.Tensor]:
        return predict_with_tta(model, images.to(_device(model)), roi=roi, flips=flips)

    @torch.no_grad()
    def embed(self, model: nn.Module, images: torch.Tensor, flips: bool = False) -> torch.Tensor:
        images = images.to(_device(model))
        was_training = model.training
        model.eval()
        try:
            views = [images, _flip(images)] if flips else [images]
            pooled = sum(model.pooled(v).float() for v in views)
        finally:
            model.train(was_training)
        return pooled / len(views)


class SlidingWindowInferer(Inferer):
    """Tiles of ``cfg.tile`` blended into the scan's ROI map, and the classifier on the
    bag of the ``cfg.bag_tiles`` tiles at the map's highest separated peaks; one scan at a
    time. Results lie on the CPU whatever the model's device.

    The network's ROI *logits* are blended (as nnU-Net does), then the sigmoid taken:
    averaging logits keeps a confident tile's evidence where a tile border disagrees
    (probabilities would flatten a node that one tile sees whole and its neighbour only
    cut), and a volume that is one tile gives exactly the whole-volume map. With the flip
    both views of each tile run in the same tile batch and are blended separately; their
    probabilities are averaged as ``WholeInferer`` does.

    The bag's tiles are cut from the scan padded as MONAI pads it (0, the normalised
    mean, where the scan is smaller than a tile); the flipped view reads the same tiles
    mirrored.
    """

    name = "sliding_window"

    def __init__(self, cfg: InferenceConfig) -> None:
        self.cfg = cfg
        x, y, z = cfg.tile
        self.tile = (z, y, x)  # (d, h, w): the sliding window's
        x, y, z = cfg.bag_tile or cfg.tile
        self.bag_tile = (z, y, x)  # the classifier's bag's tiles

    def batch_size(self, requested: int) -> int:
        return 1  # the full-size buffers are per scan: never more than one scan at a time

    def _window(
        self, model: nn.Module, flips: bool
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        """MONAI's predictor: ROI logits of a batch of tiles ``(n, 1, d, h, w)``, and with
        ``flips`` those of the mirrored tiles mirrored back."""

        def predict(tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
            roi = model(tiles, roi=True)["roi"].float()
            if not flips:
                return (roi,)
            return roi, _flip(model(_flip(tiles), roi=True)["roi"].float())

        return predict

    def roi_map(self, model: nn.Module, image: torch.Tensor, flips: bool) -> torch.Tensor:
        """The blended ROI probabilities ``(1, 1, D, H, W)`` float32 (CPU) of one scan
        ``image`` ``(1, 1, D, H, W)``; the model must be in eval mode."""
        cfg = self.cfg
        views = sliding_window_inference(
            image.float(),
            roi_size=self.tile,
            sw_batch_size=cfg.tile_batch,
            predictor=self._window(model, flips),
            overlap=cfg.overlap,
            mode=cfg.blending,
            sigma_scale=cfg.sigma_scale,
            padding_mode="constant",
            cval=0.0,
            sw_device=_device(model),
            device=torch.device("cpu"),
        )
        if isinstance(views, torch.Tensor):  # MONAI returns a 1-tuple's tensor alone
            views = (views,)
        prob = torch.sigmoid_(views[0])
        for other in views[1:]:
            prob += torch.sigmoid_(other)
        return prob.div_(len(views)) if len(views) > 1 else prob  # in place: a scan's size

    def bag_tiles(self, image: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """The bag's tiles ``(T, 1, d, h, w)`` (``inference.bag_tile``) of one scan
        ``image`` ``(1, 1, D, H, W)`` (T ≤ ``bag_tiles``): centred on the highest peaks of
        ``prob`` ``(D, H, W)`` half a bag tile apart, inside the scan padded to at least a
        bag tile, each place once."""
        padded, offset = pad_to_tile(image, self.bag_tile)
        separation = [max(1, t // 2) for t in self.bag_tile]
        centres = peaks(prob.numpy(), self.cfg.bag_tiles, separation)
        starts = tile_starts(centres, self.bag_tile, padded.shape[2:], offset)
        d, h, w = self.bag_tile
        return torch.cat([padded[..., z : z + d, y : y + h, x : x + w] for z, y, x in starts])

    def bag_logit(self, model: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
        """The classifier's logit ``(1,)`` of one scan's bag ``tiles`` ``(T, 1, d, h, w)``,
        run ``tile_batch`` tiles at a time on the model's device."""
        return model.bag(self._cells(model, tiles))

    def _cells(self, model: nn.Module, tiles: torch.Tensor) -> list[TileCells]:
        device, n = _device(model), self.cfg.tile_batch
        return [model.tile_cells(tiles[i : i + n].to(device)) for i in range(0, len(tiles), n)]

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, images: torch.Tensor, roi: bool = True, flips: bool = False
    ) -> dict[str, torch.Tensor]:
        was_training = model.training
        model.eval()
        cls, maps = [], []
        try:
            for image in images.split(1):
                prob = self.roi_map(model, image, flips)
                tiles = self.bag_tiles(image, prob[0, 0])
                views = [tiles, _flip(tiles)] if flips else [tiles]
                c = sum(torch.sigmoid(self.bag_logit(model, v).float()).cpu() for v in views)
                cls.append(c / len(views))
                if roi:
                    maps.append(prob)
        finally:
            model.train(was_training)
        out = {"cls": torch.cat(cls)}
        if roi:
            out["roi"] = torch.cat(maps)
        return out

    @torch.no_grad()
    def embed(self, model: nn.Module, images: torch.Tensor, flips: bool = False) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out = []
        try:
            for image in images.split(1):
                tiles = self.bag_tiles(image, self.roi_map(model, image, flips)[0, 0])
                views = [tiles, _flip(tiles)] if flips else [tiles]
                pooled = sum(
                    model.classifier.bag_pooled(self._cells(model, v)).float().cpu() for v in views
                )
                out.append(pooled / len(views))
        finally:
            model.train(was_training)
        return torch.cat(out)


def make_inferer(config: Config) -> Inferer:
    """The inferer that ``config.evaluation.inferer`` names."""
    if config.evaluation.inferer == "sliding_window":
        return SlidingWindowInferer(config.inference)
    return WholeInferer()
