"""Fused cosine embedding loss on hidden states: mean over rows of 1 - cos(s, t)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from distil.kernels.dispatch import cosine_rows_fn, resolve_backend
from distil.kernels.precision import needs_prescale
from distil.kernels.torch_impl import compute_dtype


def cosine_forward(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, backend: str, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows = student_hidden.shape[0]
    # fp16: the gradient (about 1 / (N |s|) per element, below fp16's subnormals for large N) is kept in
    # fp32 until the backward has multiplied it by the loss scale; [N, H] fp32, a hidden state's size.
    grad_dtype = torch.float32 if needs_prescale(student_hidden.dtype) else student_hidden.dtype
    grad = torch.empty(student_hidden.shape, dtype=grad_dtype, device=student_hidden.device) if want_grad else None
    cos = cosine_rows_fn(backend)(student_hidden, teacher_hidden, 1.0 / max(n_rows, 1), grad)
    loss = (1.0 - cos.to(compute_dtype(student_hidden.dtype))).sum() / max(n_rows, 1)
    return loss, grad


class _CosineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, backend):
        loss, ctx.grad = cosine_forward(student_hidden, teacher_hidden, backend, True)
        ctx.dtype = student_hidden.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return (ctx.grad * grad_loss).to(ctx.dtype), None, None


def cosine_embedding_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Mean over the given rows of 1 - cos(s, t) (CosineEmbeddingLoss with target 1, same eps).

    student_hidden and teacher_hidden are [N, H]; differentiable for student_hidden only; N == 0 gives 0.
    Arithmetic in fp32 (fp64 for fp64 inputs); the loss is an fp32 (fp64) scalar.
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student_hidden and teacher_hidden must both be [N, H], got {list(student_hidden.shape)} "
            f"and {list(teacher_hidden.shape)}"
        )
    chosen = resolve_backend(backend, student_hidden, teacher_hidden)
    if torch.is_grad_enabled() and student_hidden.requires_grad:
        return _CosineFunction.apply(student_hidden, teacher_hidden, chosen)
    return cosine_forward(student_hidden, teacher_hidden, chosen, False)[0]
