"""Dynamic masking: exact count, never special/pad, 80/10/10 split, smoothing as the recipe draws it."""

import math

import numpy as np
import pytest
import torch

from distil.common.errors import UserError
from distil.data_pipeline.masking import IGNORE_INDEX, Masker, MaskingConfig

VOCAB = 200
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = [PAD, UNK, CLS, SEP, MASK]


def random_batch(
    rng: np.random.Generator, batch: int = 8, width: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = np.full((batch, width), PAD, dtype=np.int64)
    lengths = rng.integers(4, width + 1, size=batch)
    for row, n in zip(ids, lengths, strict=True):
        row[0], row[n - 1] = CLS, SEP
        row[1 : n - 1] = rng.integers(5, VOCAB, size=n - 2)
        row[rng.integers(1, n - 1)] = UNK  # an [UNK] inside the text: special, never chosen
    attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(attention)


def make_masker(cfg: MaskingConfig = MaskingConfig(), counts: np.ndarray | None = None) -> Masker:
    if counts is None:
        counts = np.random.default_rng(0).integers(1, 10_000, size=VOCAB)
    return Masker(cfg, counts, SPECIAL, MASK, VOCAB)


def test_exact_count_and_never_special_or_pad():
    rng = np.random.default_rng(1)
    masker = make_masker()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids, attention = random_batch(rng)
        masked, labels = masker(ids, attention, gen)
        chosen = labels != IGNORE_INDEX
        assert int(chosen.sum()) == math.ceil(0.15 * int(attention.sum()))
        special = torch.isin(ids, torch.tensor(SPECIAL)) | (attention == 0)
        assert not (chosen & special).any()
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen])  # nothing outside the selection changes


def test_mask_batches_masks_each_batch_as_if_alone():
    rng = np.random.default_rng(6)
    masker = make_masker()
    batches = [
        random_batch(rng, batch=int(rng.integers(1, 9)), width=8 * int(rng.integers(1, 9))) for _ in range(40)
    ]
    out = masker.mask_batches(batches, torch.Generator().manual_seed(2))
    for (ids, attention), (masked, labels) in zip(batches, out, strict=True):
        assert masked.shape == ids.shape == labels.shape
        chosen = labels != IGNORE_INDEX
        assert int(chosen.sum()) == math.ceil(0.15 * int(attention.sum()))
        special = torch.isin(ids, torch.tensor(SPECIAL)) | (attention == 0)
        assert not (chosen & special).any()
        assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])


def test_count_capped_by_eligible_tokens():
    masker = make_masker(MaskingConfig(mlm_probability=1.0))
    ids = torch.tensor([[CLS, 7, 8, SEP]])
    masked, labels = masker(ids, torch.ones_like(ids))
    assert (labels != IGNORE_INDEX).sum() == 2  # only the two non-special tokens can be chosen


def test_80_10_10_split_rates():
    rng = np.random.default_rng(2)
    masker = make_masker()
    gen = torch.Generator().manual_seed(1)
    n_mask = n_random_or_same = n_same = n_total = 0
    for _ in range(200):
        ids, attention = random_batch(rng)
        masked, labels = masker(ids, attention, gen)
        chosen = labels != IGNORE_INDEX
        n_total += int(chosen.sum())
        n_mask += int((masked[chosen] == MASK).sum())
        n_same += int((masked[chosen] == ids[chosen]).sum())
        n_random_or_same += int((masked[chosen] != MASK).sum())
    # ~12k selections: 3 sigma of a 0.1 rate is ~0.008
    assert abs(n_mask / n_total - 0.8) < 0.015
    n_random = n_random_or_same - n_same  # a random draw may hit the same id (1 in VOCAB): counted as same
    assert abs(n_same / n_total - (0.1 + 0.1 / VOCAB)) < 0.012
    assert abs(n_random / n_total - 0.1 * (1 - 1 / VOCAB)) < 0.012


def inclusion_rates(select, ids: torch.Tensor, trials: int) -> torch.Tensor:
    """How often each position of `ids` is selected."""
    hits = torch.zeros(ids.numel())
    for _ in range(trials):
        hits[select()] += 1
    return hits / trials


@pytest.mark.parametrize("entry", ["call", "mask_batches"])
def test_smoothing_matches_multinomial_without_replacement(entry):
    # Half the positions hold a rare token (count 1), half a frequent one (count 1000): the recipe draws
    # torch.multinomial(count ** -0.7, k, replacement=False); our Gumbel-top-k must match its rates.
    counts = np.full(VOCAB, 1000)
    counts[10] = 1
    seq = torch.tensor([CLS] + [10, 20] * 20 + [SEP])
    attention = torch.ones_like(seq)
    masker = make_masker(counts=counts)
    k = math.ceil(0.15 * seq.numel())
    gen = torch.Generator().manual_seed(3)

    other = (torch.tensor([[CLS, 10, 10, 20, SEP, PAD]]), torch.tensor([[1, 1, 1, 1, 1, 0]]))

    def ours():
        if entry == "call":
            _, labels = masker(seq[None], attention[None], gen)
        else:  # masked alongside another, shorter batch
            (_, labels), _ = masker.mask_batches([(seq[None], attention[None]), other], gen)
        return (labels[0] != IGNORE_INDEX).nonzero().flatten()

    weights = torch.tensor(np.maximum(counts, 1) ** -0.7, dtype=torch.float64)[seq]
    weights[0] = weights[-1] = 0

    def reference():
        return torch.multinomial(weights, k, replacement=False, generator=gen)

    trials = 3000
    ours_rates, ref_rates = inclusion_rates(ours, seq, trials), inclusion_rates(reference, seq, trials)
    rare, frequent = seq == 10, seq == 20
    assert ours_rates[rare].mean() > 5 * ours_rates[frequent].mean()  # rare tokens favoured
    assert abs(ours_rates[rare].mean() - ref_rates[rare].mean()) < 0.01
    assert abs(ours_rates[frequent].mean() - ref_rates[frequent].mean()) < 0.01


def test_zero_smoothing_is_uniform():
    counts = np.full(VOCAB, 1000)
    counts[10] = 1
    seq = torch.tensor([[CLS] + [10, 20] * 20 + [SEP]])
    masker = make_masker(MaskingConfig(smoothing=0.0), counts)
    gen = torch.Generator().manual_seed(4)
    rare = frequent = 0
    for _ in range(2000):
        _, labels = masker(seq, torch.ones_like(seq), gen)
        rare += int(((labels != IGNORE_INDEX) & (seq == 10)).sum())
        frequent += int(((labels != IGNORE_INDEX) & (seq == 20)).sum())
    assert abs(rare / (rare + frequent) - 0.5) < 0.02


def test_same_generator_seed_same_mask_fresh_otherwise():
    ids, attention = random_batch(np.random.default_rng(5))
    masker = make_masker()
    a = masker(ids, attention, torch.Generator().manual_seed(7))
    b = masker(ids, attention, torch.Generator().manual_seed(7))
    c = masker(ids, attention, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    "cfg",
    [
        MaskingConfig(mlm_probability=0.0),
        MaskingConfig(mask_fraction=0.8, random_fraction=0.3),
        MaskingConfig(smoothing=-1),
    ],
)
def test_bad_config_is_a_user_error(cfg):
    with pytest.raises(UserError):
        make_masker(cfg)
