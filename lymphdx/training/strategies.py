"""The four training strategies of the paper's Table I, each a row of flags.

| strategy        | cls loss, weak | ROI loss, strong | pseudo cls, strong | pseudo ROI, weak |
|-----------------|----------------|------------------|--------------------|------------------|
| supervised      | yes            |                  |                    |                  |
| semi-supervised | yes            |                  | yes                |                  |
| multitask       | yes            | yes              |                    |                  |
| ssmdmt          | yes            | yes              | yes                | yes              |
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Strategy", "STRATEGIES", "get_strategy"]


@dataclass(frozen=True)
class Strategy:
    """Which loss terms a strategy trains (one trainer reads these flags)."""

    name: str
    roi_strong: bool  # ROI loss on the strong set's real masks
    pseudo_cls_strong: bool  # classification loss on the strong set's propagated labels
    pseudo_roi_weak: bool  # ROI loss on the weak set's propagated masks
    cls_weak: bool = True  # classification loss on the weak set's real labels (always)

    @property
    def uses_strong(self) -> bool:
        """Whether any strong-set volume is ever loaded."""
        return self.roi_strong or self.pseudo_cls_strong

    @property
    def propagates(self) -> bool:
        """Whether the training alternates with label propagation (paper §3.2)."""
        return self.pseudo_cls_strong or self.pseudo_roi_weak

    @property
    def trains_decoder(self) -> bool:
        """Whether the ROI decoder g gets any gradient."""
        return self.roi_strong or self.pseudo_roi_weak


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("supervised", roi_strong=False, pseudo_cls_strong=False, pseudo_roi_weak=False),
        Strategy(
            "semi-supervised", roi_strong=False, pseudo_cls_strong=True, pseudo_roi_weak=False
        ),
        Strategy("multitask", roi_strong=True, pseudo_cls_strong=False, pseudo_roi_weak=False),
        Strategy("ssmdmt", roi_strong=True, pseudo_cls_strong=True, pseudo_roi_weak=True),
    )
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (one of ``STRATEGIES``)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
