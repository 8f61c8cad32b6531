"""splitmix64: the one integer hash behind every seeded choice that must not depend on process or order
(held-out documents, shuffle buckets, per-batch masking seeds)."""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def splitmix64(key: int, indices: np.ndarray) -> np.ndarray:
    """splitmix64 of `indices + key` (uint64), one well-mixed 64-bit value per index."""
    with np.errstate(over="ignore"):
        x = indices.astype(np.uint64) + np.uint64(key % (1 << 64)) * np.uint64(GOLDEN) + np.uint64(GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def unit_floats(key: int, indices: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from the top 53 bits of splitmix64(key, indices)."""
    return (splitmix64(key, indices) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def mix_seed(values: list[int]) -> int:
    """A 64-bit seed from a tuple of ints (splitmix64's mixing steps on a running state): cheap per batch."""
    h = GOLDEN
    for v in values:
        h = (h ^ (v & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h
