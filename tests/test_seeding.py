"""The one seeded-randomness helper: a draw depends on its key alone."""

from __future__ import annotations

import numpy as np

from lymphdx.core.seeding import name_key, seeded_rng


def test_a_key_fixes_the_stream_and_a_single_seed_is_numpys() -> None:
    assert seeded_rng(7).random(3).tolist() == np.random.default_rng(7).random(3).tolist()
    a = seeded_rng(0, 3, 1).integers(0, 2**31, 8)
    assert a.tolist() == seeded_rng(np.int64(0), 3, 1).integers(0, 2**31, 8).tolist()
    # another epoch or stream is another stream
    assert a.tolist() != seeded_rng(0, 3, 2).integers(0, 2**31, 8).tolist()
    assert a.tolist() != seeded_rng(0, 4, 1).integers(0, 2**31, 8).tolist()


def test_name_key_is_crc32() -> None:
    assert name_key("123456789") == 0xCBF43926  # the standard CRC-32 check value
