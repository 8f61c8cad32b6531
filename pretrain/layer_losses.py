"""Losses between the layers of a teacher and a student of any shape (narrower, shallower, other head counts).

- **Projected hidden states** (TinyBERT, Jiao et al. 2020): for each mapped pair (teacher layer, student
  layer), the student's hidden states through a learned linear projection to the teacher's width, against
  the teacher's: MSE (TinyBERT) or 1 - cosine, over non-pad tokens. Embedding outputs can be a pair too.
- **Self-attention relations** (MiniLMv2, Wang et al. 2021): for one teacher layer and the student's last
  layer, the query-query, key-key and value-value relations softmax(X X^T / sqrt(d_r)) of each of R relation
  heads (the hidden size split into R parts, so R is independent of either model's head count), and
  KL(teacher relation || student relation) averaged over relation heads and non-pad query positions, keys
  masked at padding. Summed over the three relation kinds.
- **Attention probabilities** (TinyBERT): the attention distributions of mapped layers with equal head
  counts, KL(teacher || student) per head and non-pad query position.

Every loss here is computed in fp32 whatever its inputs' dtype (fp16/bf16 activations are upcast first),
and each has a plain form (the reference the tests compare with fp64) and, for relations, whose reference
holds a [batch, R, L, L] tensor per kind and its softmax for the backward pass, a memory-lean form that
computes one relation head at a time and recomputes it in the backward pass (`relation_kl_lean`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over rows and features ([N, H] each: projected student, teacher)."""
    return (student.float() - teacher.float()).pow(2).mean()


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over rows ([N, H] each)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)).mean()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, width = x.shape
    return x.float().view(b, length, heads, width // heads).transpose(1, 2)  # [B, R, L, d]


def _relation_log_probs(x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """log softmax(x x^T / sqrt(d)) over keys, padding keys excluded: [B, R, L, L]."""
    scores = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def _kl_rows(t_log: torch.Tensor, s_log: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over valid query rows of KL(t || s) over the valid keys ([B, R, L, L] log-probabilities)."""
    keys = mask[:, None, None, :]
    diff = (t_log - s_log).masked_fill(~keys, 0.0)  # padding keys: -inf - -inf, and t = 0 there
    per_row = (t_log.exp() * diff).sum(-1)
    return (per_row * mask[:, None, :].float()).sum()


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
                heads: int) -> torch.Tensor:
    """KL(teacher relation || student relation) of one kind (Q, K or V: [B, L, H_s] and [B, L, H_t]), R = heads
    relation heads, mean over relation heads and non-pad query positions. The reference form."""
    mask = attention_mask.bool()
    s, t = _heads(student, heads), _heads(teacher, heads)
    total = _kl_rows(_relation_log_probs(t, mask), _relation_log_probs(s, mask), mask)
    return total / (heads * mask.sum().clamp(min=1))


def relation_kl_lean(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
                     heads: int) -> torch.Tensor:
    """relation_kl one relation head at a time, each recomputed in the backward pass (activation
    checkpointing): holds one [B, L, L] relation at a time instead of R of them and their softmaxes."""
    mask = attention_mask.bool()
    s, t = _heads(student, heads), _heads(teacher, heads)
    def one(s_head: torch.Tensor, t_head: torch.Tensor) -> torch.Tensor:
        return _kl_rows(_relation_log_probs(t_head, mask), _relation_log_probs(s_head, mask), mask)

    total = sum(checkpoint(one, s[:, r : r + 1], t[:, r : r + 1], use_reentrant=False) for r in range(heads))
    return total / (heads * mask.sum().clamp(min=1))


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention probabilities ([B, h, L, L] each, equal head counts), mean over
    heads and non-pad query positions."""
    mask = attention_mask.bool()
    t = teacher.float()
    s_log = torch.log(student.float().clamp(min=1e-30))
    t_log = torch.log(t.clamp(min=1e-30))
    per_row = (t * (t_log - s_log)).masked_fill(~mask[:, None, None, :], 0.0).sum(-1)
    return (per_row * mask[:, None, :].float()).sum() / (teacher.shape[1] * mask.sum().clamp(min=1))


@contextmanager
def capture_qkv(projections: tuple[nn.Module, ...]) -> Iterator[list[torch.Tensor]]:
    """The outputs of a layer's query, key and value projections during a forward pass, as [q, k, v]; a
    fused projection's output ([.., 3H]) is split in three."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in projections]
    result: list[torch.Tensor] = []
    try:
        yield result
    finally:
        for h in hooks:
            h.remove()
    if len(projections) == 1 and seen:
        result.extend(seen[0].chunk(3, dim=-1))
    else:
        result.extend(seen)


class LayerPlan(nn.Module):
    """Which layer losses run, on which layers, and the learned projections they need (trained with the
    student, saved in its checkpoints, left out of its export). Built and checked before any work: each
    impossible setting is one UserError naming the key."""

    def __init__(self, cfg, teacher_config, student_config) -> None:
        from distil.common.errors import UserError

        super().__init__()
        t_layers, s_layers = int(teacher_config.num_hidden_layers), int(student_config.num_hidden_layers)
        t_width, s_width = int(teacher_config.hidden_size), int(student_config.hidden_size)
        t_heads, s_heads = int(teacher_config.num_attention_heads), int(student_config.num_attention_heads)
        self.cfg = cfg
        mapped = list(cfg.hidden_layers) if cfg.hidden_layers is not None else None
        if mapped is not None:
            if len(mapped) != s_layers:
                raise UserError(f"loss.hidden_layers={mapped} lists {len(mapped)} teacher layers but the student has "
                                f"{s_layers}: give one teacher layer (1..{t_layers}) per student layer")
            bad = [m for m in mapped if not 1 <= m <= t_layers]
            if bad:
                raise UserError(f"loss.hidden_layers has {bad}: the teacher has layers 1..{t_layers}")
            pairs = [(t, s + 1) for s, t in enumerate(mapped)]
        else:
            pairs = [(t_layers, s_layers)]
        if cfg.hidden_embeddings:
            pairs = [(0, 0), *pairs]
        self.hidden_pairs = pairs if cfg.alpha_hidden > 0 else []  # indices into hidden_states (0: embeddings)
        if cfg.alpha_attention > 0:
            if t_heads != s_heads:
                raise UserError(f"loss.alpha_attention > 0 needs equal head counts: teacher {t_heads}, student "
                                f"{s_heads}; set student.num_attention_heads={t_heads} or use loss.alpha_relations")
            self.attention_pairs = [(t - 1, s - 1) for t, s in (pairs if mapped else [(t_layers, s_layers)]) if t > 0]
        else:
            self.attention_pairs = []
        self.relation_layer = None
        self.relation_heads = cfg.relation_heads or t_heads
        if cfg.alpha_relations > 0:
            layer = cfg.relation_layer if cfg.relation_layer is not None else t_layers
            if not 1 <= layer <= t_layers:
                raise UserError(f"loss.relation_layer={layer}: the teacher has layers 1..{t_layers}")
            r = self.relation_heads
            if r < 1 or t_width % r or s_width % r:
                raise UserError(f"loss.relation_heads={r} must divide both hidden sizes (teacher {t_width}, student "
                                f"{s_width}): choose a common divisor, e.g. {math.gcd(t_width, s_width)}")
            self.relation_layer = layer - 1  # 0-based index into the teacher's layers
        self.project = s_width != t_width
        self.projections = nn.ModuleList(
            [nn.Linear(s_width, t_width) for _ in self.hidden_pairs] if self.project else [])

    @property
    def hidden_states(self) -> bool:
        return bool(self.hidden_pairs)

    @property
    def attentions(self) -> bool:
        return bool(self.attention_pairs)

    @property
    def relations(self) -> bool:
        return self.relation_layer is not None

    @property
    def active(self) -> bool:
        return self.hidden_states or self.attentions or self.relations
