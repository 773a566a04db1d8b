"""The one way lymphdx draws random numbers: a NumPy generator seeded by a key.

Every draw of a run (batch orders, ROI patches, augmentation, splits, bootstrap resamples,
the phantom) comes from ``seeded_rng(seed, *what)``: the run's seed followed by integers
that name what is drawn (epoch, stream, item, ...). A draw then depends on its key alone,
not on how many numbers were drawn before it, so a resumed run, another process of a
distributed run or a rerun of one fold replays it bit for bit. Torch's own generator
(weight initialisation, dropout) is seeded from the same run seed by the trainer.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["name_key", "seeded_rng"]


def seeded_rng(*key: int) -> np.random.Generator:
    """``np.random.default_rng`` of the integers ``key`` (each ≥ 0); equal keys give equal
    streams, and ``seeded_rng(s)`` is ``default_rng(s)``."""
    return np.random.default_rng([int(k) for k in key])


def name_key(name: str) -> int:
    """A stable integer for a text key part (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(name.encode())
