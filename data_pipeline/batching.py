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
    """(input_ids, attention_mask) as int64 arrays [B, L], L the longest length rounded up to pad_multiple."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = padded_length(int(lengths.max()), pad_multiple)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for row, seq in zip(ids, seqs, strict=True):
        row[: len(seq)] = seq
    attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, attention
