"""Fused KL(T) * T^2 + masked-LM cross-entropy on given logits, with the gradient made in the forward."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from distil.kernels.dispatch import kl_ce_rows_fn, resolve_backend
from distil.kernels.precision import needs_prescale, prescale_for, unscale
from distil.kernels.torch_impl import compute_dtype

IGNORE_INDEX = -100
# Rows per step of the torch implementation: bounds its fp32 [rows, V] temporaries.
TORCH_CHUNK_ROWS = 1024


class DistillLoss(NamedTuple):
    loss: torch.Tensor  # alpha_kl * kl + alpha_ce * ce, differentiable for the student inputs
    kl: torch.Tensor  # KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean over kl rows (detached)
    ce: torch.Tensor  # cross-entropy, mean over labelled rows (detached)


def validate_loss_inputs(
    n_rows: int,
    vocab: int,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    alpha_kl: float,
) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is None and alpha_kl != 0:
        raise ValueError("teacher logits (or hidden states) are required when alpha_kl != 0")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (n_rows, vocab):
        raise ValueError(f"teacher logits must be [{n_rows}, {vocab}], got {list(teacher_logits.shape)}")
    if tuple(labels.shape) != (n_rows,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be an int64 tensor of shape [{n_rows}], got {labels.dtype} {list(labels.shape)}"
        )
    if tuple(kl_mask.shape) != (n_rows,) or kl_mask.dtype != torch.bool:
        raise ValueError(
            f"kl_mask must be a bool tensor of shape [{n_rows}], got {kl_mask.dtype} {list(kl_mask.shape)}"
        )


def check_label_range(labels: torch.Tensor, vocab: int) -> None:
    """Labels outside [0, V) other than -100 are an error on every backend (the Triton kernels would read
    out of bounds). On a GPU this costs one host sync per call, on a tensor of N labels."""
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}; got {labels[bad][0].item()}")


class LossScales(NamedTuple):
    n_kl: torch.Tensor
    n_ce: torch.Tensor
    grad_kl: torch.Tensor  # d loss / d (row KL) divided by T: alpha_kl * T / n_kl
    grad_ce: torch.Tensor  # d loss / d (row CE): alpha_ce / n_ce

    def element_bound(self) -> torch.Tensor:
        """Bounds |d loss / d logit|: grad_kl * |q - p| + grad_ce * |softmax - onehot|, each factor <= 1."""
        kl = torch.where(self.n_kl > 0, self.grad_kl, 0.0)
        ce = torch.where(self.n_ce > 0, self.grad_ce, 0.0)
        return kl + ce


def loss_scales(
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    has_teacher: bool,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
) -> LossScales:
    """Row counts and gradient factors as device tensors, so no host sync is needed."""
    n_ce = (labels != IGNORE_INDEX).sum()
    n_kl = kl_mask.sum() if has_teacher else torch.zeros_like(n_ce)
    grad_kl = alpha_kl * temperature / n_kl.clamp(min=1).to(torch.float64)
    grad_ce = alpha_ce / n_ce.clamp(min=1).to(torch.float64)
    return LossScales(n_kl, n_ce, grad_kl, grad_ce)


def assemble_loss(
    kl_sum: torch.Tensor,
    ce_sum: torch.Tensor,
    scales: LossScales,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) from summed per-row values; a loss over zero rows is 0."""
    kl = kl_sum * temperature**2 / scales.n_kl.clamp(min=1).to(kl_sum.dtype)
    ce = ce_sum / scales.n_ce.clamp(min=1).to(ce_sum.dtype)
    return alpha_kl * kl + alpha_ce * ce, kl, ce


def kl_ce_forward(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    backend: str,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(loss, kl, ce, d loss / d student_logits times `prescale` (or None), prescale); see precision.py."""
    n_rows = student_logits.shape[0]
    scales = loss_scales(labels, kl_mask, teacher_logits is not None, temperature, alpha_kl, alpha_ce)
    prescale = prescale_for(student_logits.dtype, scales.element_bound())
    grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format) if want_grad else None
    rows_fn = kl_ce_rows_fn(backend)
    sum_dtype = compute_dtype(student_logits.dtype)
    kl_sum = torch.zeros((), dtype=sum_dtype, device=student_logits.device)
    ce_sum = torch.zeros((), dtype=sum_dtype, device=student_logits.device)
    step = max(n_rows, 1) if backend == "triton" else TORCH_CHUNK_ROWS
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        kl_rows, ce_rows = rows_fn(
            student_logits[rows],
            teacher_logits[rows] if teacher_logits is not None else None,
            labels[rows],
            kl_mask[rows],
            scales.grad_kl * prescale,
            scales.grad_ce * prescale,
            temperature,
            grad[rows] if grad is not None else None,
        )
        kl_sum += kl_rows.sum()
        ce_sum += ce_rows.sum()
    loss, kl, ce = assemble_loss(kl_sum, ce_sum, scales, temperature, alpha_kl, alpha_ce)
    return loss, kl, ce, grad, prescale


class _KLCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_logits,
        teacher_logits,
        labels,
        kl_mask,
        temperature,
        alpha_kl,
        alpha_ce,
        backend,
        inplace,
    ):
        loss, kl, ce, grad, prescale = kl_ce_forward(
            student_logits, teacher_logits, labels, kl_mask, temperature, alpha_kl, alpha_ce, backend, True
        )
        ctx.grad = grad
        ctx.prescale = prescale
        ctx.inplace = inplace
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        # The loss is the last layer: backward only scales the gradient made in the forward.
        nones = (None,) * 8
        if not ctx.inplace:
            if not needs_prescale(ctx.grad.dtype):
                return ctx.grad * grad_loss, *nones
            return unscale(ctx.grad, grad_loss, ctx.prescale, inplace=False), *nones
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("distillation_kl_ce(inplace_backward=True): backward can run only once")
        if not needs_prescale(grad.dtype):
            return grad.mul_(grad_loss), *nones
        return unscale(grad, grad_loss, ctx.prescale, inplace=True), *nones


def distillation_kl_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    *,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> DistillLoss:
    """alpha_kl * KL(softmax(t/T) || softmax(s/T)) * T^2 + alpha_ce * CE, fused over the vocabulary.

    student_logits [N, V] (fp32/bf16/fp16/fp64); teacher_logits [N, V] or None when alpha_kl == 0;
    labels [N] with -100 for rows without an MLM target; kl_mask [N] bool, the rows the KL covers.
    KL is batchmean over the kl_mask rows (as KLDivLoss(reduction="batchmean") on those rows), CE the
    mean over labelled rows; either is 0 when it covers no rows. Only `loss` carries a gradient, for
    student_logits (the teacher is a constant). The gradient is computed in the forward and kept with
    the graph (one [N, V] buffer in the student's dtype; for fp16, pre-multiplied by a power of two so that
    small gradients do not underflow before the loss scale arrives, see precision.py); backward scales it by
    the incoming gradient,
    into a new tensor, or with inplace_backward=True into that buffer (one [N, V] less at backward, but
    the graph can then be run backward only once). backend: "auto" | "triton" | "torch" (see kernels.dispatch).
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {list(student_logits.shape)}")
    n_rows, vocab = student_logits.shape
    validate_loss_inputs(n_rows, vocab, teacher_logits, labels, kl_mask, temperature, alpha_kl)
    chosen = resolve_backend(backend, student_logits, teacher_logits)
    check_label_range(labels, vocab)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss, kl, ce = _KLCEFunction.apply(
            student_logits, teacher_logits, labels, kl_mask, temperature, alpha_kl, alpha_ce, chosen,
            inplace_backward,
        )  # fmt: skip
    else:
        loss, kl, ce, _, _ = kl_ce_forward(
            student_logits, teacher_logits, labels, kl_mask, temperature, alpha_kl, alpha_ce, chosen, False
        )
    return DistillLoss(loss, kl.detach(), ce.detach())
