"""The recipe's losses written the plain eager way (DistilBERT reference `distiller.py`).

Full [N, V] logits, torch's own loss modules, autograd for the gradients. The tests check the fused
implementations against these, and the benchmarks time them as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def recipe_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) * T^2 over the given rows."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = nn.KLDivLoss(reduction="batchmean")
    return (
        kl(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.softmax(teacher_logits / temperature, dim=-1),
        )
        * temperature**2
    )


def recipe_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CrossEntropyLoss(ignore_index=-100), mean over labelled rows; 0 when there are none."""
    if not bool((labels != -100).any()):
        return student_logits.sum() * 0.0
    return nn.CrossEntropyLoss(ignore_index=-100)(student_logits, labels)


def recipe_kl_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) the eager way: KL over the kl_mask rows, CE over labelled rows."""
    ce = recipe_ce(student_logits, labels)
    if teacher_logits is None:
        kl = torch.zeros((), dtype=ce.dtype, device=ce.device)
    else:
        kl = recipe_kl(student_logits[kl_mask], teacher_logits[kl_mask], temperature)
    return alpha_kl * kl + alpha_ce * ce, kl, ce


def recipe_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """CosineEmbeddingLoss(mean)(s, t, target=1) over the given rows; 0 when there are none."""
    if student_hidden.shape[0] == 0:
        return student_hidden.sum() * 0.0
    target = torch.ones(student_hidden.shape[0], dtype=student_hidden.dtype, device=student_hidden.device)
    return nn.CosineEmbeddingLoss(reduction="mean")(student_hidden, teacher_hidden, target)
