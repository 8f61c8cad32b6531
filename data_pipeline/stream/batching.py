"""Cutting a buffer of sequences into batches: by length group (the recipe's group_by_size) or token budget.

Grouping works within one buffer of samples at a time (a "sort within buffer" form of the recipe's
GroupedBatchSampler): shuffle the buffer, stable-sort it by length bin (bins np.arange(3, max_len, 4) as the
recipe), cut consecutive runs into batches, shuffle the batch order. Batches of similar lengths waste little
padding while the order stays random.
"""

from __future__ import annotations

import numpy as np


def length_bins(max_len: int) -> np.ndarray:
    return np.arange(3, max(max_len, 4), 4)


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def _order_by_length(
    lengths: np.ndarray, rng: np.random.Generator, max_len: int, group_by_size: bool
) -> np.ndarray:
    order = rng.permutation(len(lengths))
    if group_by_size:
        bins = np.digitize(lengths[order], length_bins(max_len))
        order = order[np.argsort(bins, kind="stable")]
    return order


def fixed_size_batches(
    lengths: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    *,
    max_len: int,
    group_by_size: bool = True,
) -> list[np.ndarray]:
    """Index arrays of `batch_size` samples (the last one may be smaller); ceil(n / batch_size) of them."""
    order = _order_by_length(lengths, rng, max_len, group_by_size)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def token_budget_batches(
    lengths: np.ndarray,
    max_tokens: int,
    rng: np.random.Generator,
    *,
    max_len: int,
    pad_multiple: int = 8,
) -> list[np.ndarray]:
    """Index arrays whose padded size (samples x longest, rounded up to pad_multiple) stays <= max_tokens.

    Samples are visited in ascending length (ties in random order), so each batch's longest sample is its
    last and a batch closes as soon as one more sample would break the budget.
    """
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order) + 1):
        if (
            i == len(order)
            or (i - start + 1) * padded_length(int(lengths[order[i]]), pad_multiple) > max_tokens
        ):
            batches.append(order[start:i])
            start = i
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_sequences(
    seqs: list[np.ndarray], pad_id: int, pad_multiple: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64 arrays [B, L], L the longest length rounded up to pad_multiple.
    One batch, one row at a time: the plain form of what batch_rows does for many batches at once."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = padded_length(int(lengths.max()), pad_multiple)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for row, seq in zip(ids, seqs, strict=True):
        row[: len(seq)] = seq
    attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, attention


def batch_rows(
    flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, groups: list[np.ndarray], pad_id: int,
    pad_multiple: int = 8,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Several batches at once, each flattened into one row (the layout Masker.mask_rows masks).

    Batch b (the sequences groups[b] of a chunk laid end to end in `flat`: sequence i is
    flat[starts[i] : starts[i] + lengths[i]]) is padded to [B_b, W_b], W_b its longest length rounded up
    to pad_multiple, as pad_sequences pads one batch, and laid out row-major in row b of
    int64 arrays [len(groups), max B_b x W_b] of ids and attention; cells past a batch's end hold pad_id
    and 0. Returns (ids, attention, [(B_b, W_b)]). One set of array operations for all the batches, so
    the cost per batch does not grow with their number (short sequences make many small batches).
    Every length must be >= 1."""
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    longest = np.maximum.reduceat(lengths[np.concatenate(groups)], np.cumsum(sizes) - sizes)
    widths = -(-longest // pad_multiple) * pad_multiple
    cells = int((sizes * widths).max())
    members = np.zeros((len(groups), int(sizes.max())), dtype=np.int64)  # sample index per batch row
    members[np.repeat(np.arange(len(groups)), sizes), np.concatenate([np.arange(n) for n in sizes])] = (
        np.concatenate(groups))
    cell = np.arange(cells)[None, :]
    row, column = cell // widths[:, None], cell % widths[:, None]
    inside = row < sizes[:, None]
    sample = np.take_along_axis(members, np.minimum(row, members.shape[1] - 1), axis=1)
    length = lengths[sample]
    real = inside & (column < length)
    ids = np.where(real, flat[starts[sample] + np.minimum(column, length - 1)], pad_id).astype(np.int64, copy=False)
    return ids, real.astype(np.int64), list(zip(sizes.tolist(), widths.tolist(), strict=True))
