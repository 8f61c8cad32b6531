"""Decoding a chunk's raw samples: the chunk-wide fast path and the per-sample path give the same ids, and
every sample that cannot be used is left out and counted."""

from __future__ import annotations

import numpy as np
from shardset import npy_bytes

from distil.data_pipeline.stream.plan import ChunkStats
from distil.data_pipeline.stream.read import RawSample, decode_samples

VOCAB, MAX_LEN = 1000, 64


def raw(key: str, ids) -> RawSample:
    return RawSample("shard.tar", key, None if ids is None else npy_bytes(np.asarray(ids)))


def test_fast_and_per_sample_paths_agree():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, size=int(n)) for n in rng.integers(2, MAX_LEN + 1, size=50)]
    uniform = [raw(str(i), s.astype(np.uint16)) for i, s in enumerate(seqs)]
    mixed = [raw(str(i), s.astype(np.uint16 if i % 3 else np.int32)) for i, s in enumerate(seqs)]  # per sample
    for samples in (uniform, mixed):
        stats = ChunkStats()
        flat, lengths = decode_samples(samples, VOCAB, MAX_LEN, stats)
        assert flat.dtype == np.int64 and lengths.tolist() == [len(s) for s in seqs]
        assert np.array_equal(flat, np.concatenate(seqs)) and stats.skipped_samples == 0


def test_unusable_samples_are_left_out_and_counted():
    good = [np.arange(5, 5 + n) for n in (3, 10, 64)]
    samples = [
        raw("a", good[0].astype(np.uint16)),
        None,  # the shard could not deliver it: counted by the reader, not here
        raw("b", None),  # no ids.npy member
        raw("c", np.array([5, VOCAB], dtype=np.uint16)),  # an id outside the vocabulary
        raw("d", np.array([5], dtype=np.uint16)),  # shorter than 2
        raw("e", np.arange(MAX_LEN + 1, dtype=np.uint16)),  # longer than max_len
        raw("f", np.array([[5, 6]], dtype=np.uint16)),  # not 1-D
        raw("g", np.array([5, -1], dtype=np.int32)),  # negative
        RawSample("shard.tar", "h", b"\x93NUMPY\x01\x00garbage"),  # not a .npy
        raw("i", good[1].astype(np.int64)),
        raw("j", good[2].astype(np.uint16)),
    ]
    stats = ChunkStats()
    flat, lengths = decode_samples(samples, VOCAB, MAX_LEN, stats)
    assert lengths.tolist() == [3, 10, 64] and np.array_equal(flat, np.concatenate(good))
    assert stats.skipped_samples == 7


def test_nothing_usable_is_empty():
    stats = ChunkStats()
    flat, lengths = decode_samples([None, raw("x", None)], VOCAB, MAX_LEN, stats)
    assert flat.size == 0 and lengths.size == 0 and stats.skipped_samples == 1
