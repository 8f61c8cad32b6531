"""Length grouping, token budgets and padding."""

import numpy as np

from distil.data_pipeline.stream.batching import (
    batch_rows,
    fixed_size_batches,
    pad_sequences,
    padded_length,
    token_budget_batches,
)


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_fixed_size_batches_cover_every_sample_once():
    lengths = np.random.default_rng(0).integers(12, 512, size=1003)
    batches = fixed_size_batches(lengths, 16, np.random.default_rng(1), max_len=512)
    assert len(batches) == -(-1003 // 16)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1003))
    assert sorted(len(b) for b in batches)[1:] == [16] * (len(batches) - 1)


def test_group_by_size_cuts_padding():
    lengths = np.random.default_rng(0).integers(12, 512, size=2000)
    grouped = fixed_size_batches(lengths, 16, np.random.default_rng(1), max_len=512, group_by_size=True)
    plain = fixed_size_batches(lengths, 16, np.random.default_rng(1), max_len=512, group_by_size=False)
    assert padding_waste(lengths, grouped) * 10 < padding_waste(lengths, plain)


def test_batch_order_is_shuffled_and_seeded():
    lengths = np.random.default_rng(0).integers(12, 512, size=500)
    a = fixed_size_batches(lengths, 10, np.random.default_rng(1), max_len=512)
    b = fixed_size_batches(lengths, 10, np.random.default_rng(1), max_len=512)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    longest = [int(lengths[x].max()) for x in a]
    assert longest != sorted(longest)  # not served shortest first


def test_token_budget_respected_and_complete():
    lengths = np.random.default_rng(0).integers(12, 512, size=1000)
    batches = token_budget_batches(lengths, 4096, np.random.default_rng(1), max_len=512, pad_multiple=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    for b in batches:
        assert len(b) * padded_length(int(lengths[b].max()), 8) <= 4096
    used = sum(len(b) * padded_length(int(lengths[b].max()), 8) for b in batches)
    assert used > 0.85 * len(batches) * 4096  # batches are filled, not cut early


def test_pad_sequences_rounds_width_and_marks_real_tokens():
    seqs = [np.array([2, 7, 3], dtype=np.uint16), np.arange(2, 13, dtype=np.uint16)]
    ids, attention = pad_sequences(seqs, pad_id=0, pad_multiple=8)
    assert ids.shape == (2, 16) and ids.dtype == np.int64
    assert attention.sum(axis=1).tolist() == [3, 11]
    assert ids[0, :3].tolist() == [2, 7, 3] and (ids[0, 3:] == 0).all()


def test_batch_rows_lay_out_each_batch_as_pad_sequences_does():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 70, size=300)
    flat = rng.integers(5, 1000, size=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths
    order = rng.permutation(300)
    groups = [order[i : i + n] for i, n in zip(range(0, 300, 37), [37, 1, 20, 37, 37, 37, 37, 37, 57], strict=False)]
    ids, attention, shapes = batch_rows(flat, starts, lengths, groups, pad_id=0, pad_multiple=8)
    assert ids.shape[0] == len(groups) == len(shapes)
    for row, (group, (size, width)) in enumerate(zip(groups, shapes, strict=True)):
        want_ids, want_attention = pad_sequences([flat[starts[i] : starts[i] + lengths[i]] for i in group], 0, 8)
        assert (size, width) == want_ids.shape
        assert np.array_equal(ids[row, : size * width].reshape(size, width), want_ids)
        assert np.array_equal(attention[row, : size * width].reshape(size, width), want_attention)
        assert not attention[row, size * width :].any() and (ids[row, size * width :] == 0).all()
