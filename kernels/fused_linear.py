"""The vocabulary projection fused with the distillation losses, chunk by chunk over rows.

For each chunk of rows: student logits = hidden @ W^T + b, teacher logits (given, or projected from
the teacher's hidden states under no_grad), then the KL/CE rows kernel overwrites the student logits
with their gradient, which is multiplied straight back into gradients for hidden, W and b. So at most
one chunk of [rows, V] student (and teacher) logits exists at a time, and backward only scales.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from distil.kernels.dispatch import kl_ce_rows_fn, resolve_backend
from distil.kernels.kl_ce import (
    DistillLoss,
    assemble_loss,
    check_label_range,
    loss_scales,
    validate_loss_inputs,
)
from distil.kernels.precision import needs_prescale, prescale_for, unscale
from distil.kernels.torch_impl import compute_dtype

# Per chunk the fp32 weight-gradient accumulator is read and written once ([V, H] fp32, ~94 MB for BERT),
# which costs more than the chunk's weight-gradient matmul itself when chunks are small on a GPU; CPU
# matmuls are slow enough that small chunks (less memory, warmer caches) cost nothing there.
MIN_CHUNK_ROWS = {"cuda": 2048}
MIN_CHUNK_ROWS_OTHER = 256


def default_chunk_size(n_rows: int, vocab: int, hidden: int, device: torch.device) -> int:
    """Rows per chunk: a chunk's logits about the size of the whole hidden input (Liger-Kernel's rule
    of thumb for its fused linear cross-entropy: V/H chunks), at least 2048 rows on CUDA, 256 elsewhere.
    """
    rows = math.ceil(max(n_rows, 1) / math.ceil(vocab / max(hidden, 1)))
    floor = MIN_CHUNK_ROWS.get(device.type, MIN_CHUNK_ROWS_OTHER)
    return max(floor, 1 << (rows - 1).bit_length())


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


class _Accumulators:
    """The gradients of one call, filled chunk by chunk in the forward and scaled in the backward.

    Weight and bias gradients accumulate in fp32 (fp64 for fp64) and are cast to the parameters' dtype only
    after the backward's scale. For fp16 the logits' gradient arrives pre-multiplied by `prescale` (see
    precision.py), so its matmuls run in fp32 and the hidden-state gradient is kept in fp32 too: an fp16
    product of pre-scaled gradients could overflow, and an unscaled one would underflow.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 want: tuple[bool, bool, bool], prescale: torch.Tensor, compute: torch.dtype):
        want_h, want_w, want_b = want
        self.prescale = prescale
        self.fp32_matmuls = needs_prescale(compute)
        acc = compute_dtype(weight.dtype)
        h_dtype = torch.float32 if self.fp32_matmuls else hidden.dtype
        self.hidden = torch.empty(hidden.shape, dtype=h_dtype, device=hidden.device) if want_h else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        self.out_dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add_chunk(self, rows: slice, grad_logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        if self.fp32_matmuls:
            grad_logits, h, w = grad_logits.float(), h.float(), w.float()
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ w
        if self.weight is not None and self.weight.dtype == grad_logits.dtype:
            self.weight.addmm_(grad_logits.t(), h)
        elif self.weight is not None:  # low-precision chunks, fp32 accumulator: one [V, H] temporary per chunk
            self.weight += grad_logits.t() @ h
        if self.bias is not None:
            self.bias += grad_logits.sum(dim=0, dtype=self.bias.dtype)

    def scaled(self, incoming: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """d loss / d (hidden, weight, bias) times the incoming gradient, each in its input's dtype."""
        out = []
        for grad, dtype in zip((self.hidden, self.weight, self.bias), self.out_dtypes, strict=True):
            if grad is None:
                out.append(None)
            elif grad.dtype == dtype and not needs_prescale(dtype):
                out.append(grad * incoming)
            else:
                out.append(unscale(grad, incoming, self.prescale, inplace=False, out_dtype=dtype))
        return tuple(out)


def _teacher_chunk(rows: slice, teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None,
                   teacher_weight: torch.Tensor | None, teacher_bias: torch.Tensor | None) -> torch.Tensor | None:
    with torch.no_grad():
        if teacher_logits is not None:
            return teacher_logits[rows]
        if teacher_hidden is None:
            return None
        t_dtype = torch.promote_types(teacher_hidden.dtype, teacher_weight.dtype)
        t_b = teacher_bias.to(t_dtype) if teacher_bias is not None else None
        return _project(teacher_hidden[rows].to(t_dtype), teacher_weight.to(t_dtype), t_b)


def fused_linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    chunk_size: int,
    backend: str,
    want: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Accumulators]:
    """(loss, kl, ce, the gradient accumulators); a gradient is None where `want` says no."""
    has_teacher = teacher_logits is not None or teacher_hidden is not None
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    scales = loss_scales(labels, kl_mask, has_teacher, temperature, alpha_kl, alpha_ce)
    prescale = prescale_for(dtype, scales.element_bound())
    grads = _Accumulators(hidden, weight, bias, (want[0], want[1], want[2] and bias is not None), prescale, dtype)
    rows_fn = kl_ce_rows_fn(backend)
    kl_sum = torch.zeros((), dtype=compute_dtype(dtype), device=hidden.device)
    ce_sum = torch.zeros_like(kl_sum)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        h = hidden[rows].to(dtype)
        logits = _project(h, w, b)
        t = _teacher_chunk(rows, teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
        # The rows kernel overwrites the logits with their (pre-scaled) gradient.
        kl_rows, ce_rows = rows_fn(logits, t, labels[rows], kl_mask[rows], scales.grad_kl * prescale,
                                   scales.grad_ce * prescale, temperature, logits if grads.any else None)
        del t
        kl_sum += kl_rows.sum()
        ce_sum += ce_rows.sum()
        if grads.any:
            grads.add_chunk(rows, logits, h, w)
        del logits
    loss, kl, ce = assemble_loss(kl_sum, ce_sum, scales, temperature, alpha_kl, alpha_ce)
    return loss, kl, ce, grads


class _FusedLinearKLCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        teacher,
        labels,
        kl_mask,
        temperature,
        alpha_kl,
        alpha_ce,
        chunk_size,
        backend,
    ):
        teacher_logits, teacher_hidden, teacher_weight, teacher_bias = teacher
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        loss, kl, ce, grads = fused_linear_forward(
            hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
            labels, kl_mask, temperature, alpha_kl, alpha_ce, chunk_size, backend, want,
        )  # fmt: skip
        ctx.grads = grads
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        return (*ctx.grads.scaled(grad_loss), None, None, None, None, None, None, None, None)


def _validate_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"student_hidden [N, H] and weight [V, H] must agree, got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    if teacher_logits is not None and teacher_hidden is not None:
        raise ValueError("give the teacher as teacher_logits or as teacher_hidden + teacher_weight, not both")
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (and optionally teacher_bias)")
        if (
            teacher_hidden.dim() != 2
            or teacher_hidden.shape[0] != hidden.shape[0]
            or tuple(teacher_weight.shape) != (weight.shape[0], teacher_hidden.shape[1])
        ):
            raise ValueError(
                f"teacher_hidden [N, H_t] and teacher_weight [V, H_t] must match N={hidden.shape[0]}, "
                f"V={weight.shape[0]}; got {list(teacher_hidden.shape)} and {list(teacher_weight.shape)}"
            )
        if teacher_bias is not None and tuple(teacher_bias.shape) != (weight.shape[0],):
            raise ValueError(f"teacher_bias must be [{weight.shape[0]}], got {list(teacher_bias.shape)}")


def fused_linear_distillation_kl_ce(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    temperature: float,
    alpha_kl: float,
    alpha_ce: float,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> DistillLoss:
    """distillation_kl_ce(student_hidden @ weight^T + bias, teacher, ...) without full [N, V] logits.

    The teacher is either teacher_logits [N, V] or teacher_hidden [N, H_t] with teacher_weight [V, H_t]
    (+ teacher_bias), projected chunk by chunk under no_grad; it may be absent when alpha_kl == 0.
    Gradients go to student_hidden, weight and bias (those that require grad), made in the forward
    (backward only scales them). The matmuls run in the promoted dtype of hidden and weight, autocast off.
    chunk_size: rows per chunk (default: default_chunk_size). backend: "auto" | "triton" | "torch".
    """
    _validate_linear(
        student_hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias
    )
    n_rows, vocab = student_hidden.shape[0], weight.shape[0]
    has_teacher = teacher_logits is not None or teacher_hidden is not None
    validate_loss_inputs(
        n_rows, vocab, teacher_logits, labels, kl_mask, temperature, alpha_kl if not has_teacher else 0.0
    )
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, vocab, student_hidden.shape[1], student_hidden.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chosen = resolve_backend(backend, student_hidden, weight)
    check_label_range(labels, vocab)
    teacher = (teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
    tensors = (student_hidden, weight, bias)
    with torch.autocast(device_type=student_hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            loss, kl, ce = _FusedLinearKLCEFunction.apply(
                student_hidden, weight, bias, teacher, labels, kl_mask, temperature, alpha_kl, alpha_ce,
                chunk_size, chosen,
            )  # fmt: skip
        else:
            loss, kl, ce, _ = fused_linear_forward(
                *tensors, *teacher, labels, kl_mask, temperature, alpha_kl, alpha_ce, chunk_size, chosen,
                (False, False, False),
            )  # fmt: skip
    return DistillLoss(loss, kl.detach(), ce.detach())
