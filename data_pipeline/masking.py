"""Dynamic MLM masking, drawn fresh for every batch (the recipe's `prepare_batch_mlm`, vectorised).

Per batch, ceil(mlm_probability x real tokens) positions are chosen without replacement with probability
proportional to max(count, 1) ** -smoothing (special tokens and padding never). Instead of
`torch.multinomial(replacement=False)` over the flattened batch this uses the Gumbel-top-k trick
(log w + Gumbel noise, keep the k largest), which draws from the same distribution as successive sampling
without replacement, in one `topk` on whatever device the batch lives on. Of the chosen positions
`mask_fraction` become [MASK], `random_fraction` a uniformly random vocabulary id, the rest stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distil.common.errors import UserError

IGNORE_INDEX = -100


@dataclass
class MaskingConfig:
    mlm_probability: float = 0.15
    smoothing: float = 0.7  # token prob ∝ max(count, 1) ** -smoothing
    mask_fraction: float = 0.8  # of selected: [MASK]
    random_fraction: float = 0.1  # of selected: random token; the rest unchanged

    def validate(self) -> None:
        if not 0.0 < self.mlm_probability <= 1.0:
            raise UserError(f"masking mlm_probability {self.mlm_probability} must be in (0, 1]")
        if self.smoothing < 0.0:
            raise UserError(f"masking smoothing {self.smoothing} must be >= 0")
        if (
            self.mask_fraction < 0.0
            or self.random_fraction < 0.0
            or self.mask_fraction + self.random_fraction > 1.0
        ):
            raise UserError(
                f"masking mask_fraction {self.mask_fraction} and random_fraction {self.random_fraction} "
                "must be >= 0 and sum to at most 1"
            )


def token_weights(
    token_counts: np.ndarray, smoothing: float, special_token_ids: list[int], vocab_size: int
) -> np.ndarray:
    """Selection weight per vocabulary id: max(count, 1) ** -smoothing, 0 for special tokens."""
    counts = np.asarray(token_counts, dtype=np.float64).reshape(-1)
    if counts.shape[0] < vocab_size:
        counts = np.concatenate([counts, np.zeros(vocab_size - counts.shape[0])])
    weights = np.maximum(counts[:vocab_size], 1.0) ** -smoothing
    weights[[i for i in special_token_ids if 0 <= i < vocab_size]] = 0.0
    return weights.astype(np.float32)


class Masker:
    """Callable that masks a padded batch; holds the per-token weights (moved to the batch's device on use)."""

    def __init__(
        self,
        cfg: MaskingConfig,
        token_counts: np.ndarray,
        special_token_ids: list[int],
        mask_token_id: int,
        vocab_size: int,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(vocab_size)
        # log of the weights, -inf for special tokens: the Gumbel keys below are log w + noise.
        with np.errstate(divide="ignore"):
            log_w = np.log(token_weights(token_counts, cfg.smoothing, special_token_ids, vocab_size))
        self._log_weights = {torch.device("cpu"): torch.from_numpy(log_w)}

    def _log_weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._log_weights:
            self._log_weights[device] = self._log_weights[torch.device("cpu")].to(device)
        return self._log_weights[device]

    def __call__(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Returns (masked input_ids, labels), labels -100 wherever there is nothing to predict."""
        masked, labels = self.mask_rows(input_ids.reshape(1, -1), attention_mask.reshape(1, -1), generator)
        return masked.view_as(input_ids), labels.view_as(input_ids)

    def mask_batches(
        self,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Masks several (input_ids, attention_mask) batches with one set of tensor ops instead of one per
        batch; each batch gets its own ceil(rate x its real tokens) positions, as if masked alone."""
        sizes = [ids.numel() for ids, _ in batches]
        ids = batches[0][0].new_zeros((len(batches), max(sizes)))
        attention = torch.zeros_like(ids)
        for row, (b_ids, b_attention) in enumerate(batches):
            ids[row, : sizes[row]] = b_ids.reshape(-1)
            attention[row, : sizes[row]] = b_attention.reshape(-1)
        masked, labels = self.mask_rows(ids, attention, generator)
        return [
            (masked[row, :n].view_as(b_ids), labels[row, :n].view_as(b_ids))
            for row, (n, (b_ids, _)) in enumerate(zip(sizes, batches, strict=True))
        ]

    def mask_rows(
        self, ids: torch.Tensor, attention: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks each row of [R, N] ids as one batch: ceil(rate x real tokens of the row) positions."""
        device = ids.device
        real = attention != 0
        log_w = self._log_weights_on(device)[ids]  # ids must be < vocab_size (the loader checks)
        log_w.masked_fill_(~real, float("-inf"))
        # float64, as math.ceil(rate * n) in the recipe
        wanted = torch.ceil(real.sum(dim=1, dtype=torch.float64) * self.cfg.mlm_probability).long()
        labels = torch.full_like(ids, IGNORE_INDEX)
        masked = ids.clone()
        most = min(int(wanted.max()), ids.shape[1])
        if most == 0:
            return masked, labels
        # Gumbel-top-k: keys log w - log(-log U); ineligible positions stay at -inf. U is kept off 0 so
        # an eligible key is always finite.
        noise = torch.rand(ids.shape, generator=generator, device=device).clamp_min_(1e-30)
        keys = log_w.sub_(noise.log_().neg_().log_())
        top = torch.topk(keys, most, dim=1, sorted=True)
        # row r keeps its first wanted[r] keys; a -inf key means the row ran out of eligible tokens
        keep = (torch.arange(most, device=device)[None, :] < wanted[:, None]) & torch.isfinite(top.values)
        rows = torch.arange(ids.shape[0], device=device)[:, None].expand(-1, most)[keep]
        cols = top.indices[keep]
        original = ids[rows, cols]
        labels[rows, cols] = original

        action = torch.rand(original.shape, generator=generator, device=device)
        random_ids = torch.randint(0, self.vocab_size, original.shape, generator=generator, device=device)
        replacement = torch.where(
            action < self.cfg.mask_fraction + self.cfg.random_fraction, random_ids, original
        )
        replacement.masked_fill_(action < self.cfg.mask_fraction, self.mask_token_id)
        masked[rows, cols] = replacement
        return masked, labels


def unmasked_labels(input_ids: torch.LongTensor, attention_mask: torch.LongTensor) -> torch.LongTensor:
    """Labels for a batch that is not masked: the ids themselves, -100 on padding."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
