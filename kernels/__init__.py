"""Fused distillation losses: Triton kernels on CUDA, torch implementations elsewhere.

Public API (see each function's docstring):
- distillation_kl_ce(student_logits, teacher_logits, labels, kl_mask, T, alpha_kl, alpha_ce) -> DistillLoss
- fused_linear_distillation_kl_ce(student_hidden, weight, bias, teacher_logits, labels, kl_mask, T,
  alpha_kl, alpha_ce, *, teacher_hidden=None, teacher_weight=None, teacher_bias=None, chunk_size=None)
- cosine_embedding_loss(student_hidden, teacher_hidden) -> scalar
All take an optional keyword `backend="auto"|"triton"|"torch"` (default from $DISTIL_KERNELS_BACKEND,
else "auto": Triton for CUDA tensors, torch otherwise).
"""

from distil.kernels.cosine import cosine_embedding_loss
from distil.kernels.fused_linear import fused_linear_distillation_kl_ce
from distil.kernels.kl_ce import DistillLoss, distillation_kl_ce

__all__ = ["DistillLoss", "cosine_embedding_loss", "distillation_kl_ce", "fused_linear_distillation_kl_ce"]
