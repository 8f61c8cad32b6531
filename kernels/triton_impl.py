"""Triton kernels for the distillation losses.

Imported lazily by the dispatchers (only when the Triton backend is chosen), so CPU users never need
triton and the interpreter switch (TRITON_INTERPRET=1) can be set before the kernels are decorated.

Each kernel handles one row per program and computes the loss and its gradient in one launch: a first
sweep over the columns keeps running (online) log-sum-exps in fp32, a second sweep writes the gradient.
No [N, V] temporaries beyond the caller's input and gradient buffers; the gradient buffer may be the
input itself (the fused-linear form overwrites its chunk of logits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distil.kernels.dispatch import check_interpreted
from distil.kernels.torch_impl import COSINE_EPS

MAX_BLOCK_CUDA = 4096
# Under the interpreter a smaller block keeps the column loop exercised at test-sized vocabularies.
MAX_BLOCK_INTERPRETER = 128


@triton.jit
def _kl_ce_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    labels_ptr,
    kl_mask_ptr,
    scale_kl_ptr,
    scale_ce_ptr,
    kl_rows_ptr,
    ce_rows_ptr,
    n_cols,
    inv_temp,
    HAS_TEACHER: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)

    label = tl.load(labels_ptr + row)
    has_ce = label != -100
    safe_label = tl.where(has_ce, label, 0)
    # Read before the second sweep, which may overwrite s in place.
    s_label = tl.load(s_row + safe_label).to(tl.float32)

    # Sweep 1: online log-sum-exp over the columns of s, s/T and t/T.
    m_s = float("-inf")
    d_s = 0.0
    # The KL's normalisers are summed in fp64: KL is a small difference of O(1) terms when the two
    # distributions are close (high T), and fp32 sums leave ~1e-5 relative error there.
    m_sT = float("-inf")
    d_sT = tl.full((), 0.0, tl.float64)
    m_tT = float("-inf")
    d_tT = tl.full((), 0.0, tl.float64)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_s, tl.max(s, 0))
        d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), 0)
        m_s = m_new
        if HAS_TEACHER:
            sT = s * inv_temp
            m_new = tl.maximum(m_sT, tl.max(sT, 0))
            d_sT = d_sT * tl.exp((m_sT - m_new).to(tl.float64)) + tl.sum(tl.exp(sT - m_new).to(tl.float64), 0)
            m_sT = m_new
            tT = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m_tT, tl.max(tT, 0))
            d_tT = d_tT * tl.exp((m_tT - m_new).to(tl.float64)) + tl.sum(tl.exp(tT - m_new).to(tl.float64), 0)
            m_tT = m_new
    # Log-softmax as (x - m) - log(d), like torch: keeping the max apart from log(d) keeps the
    # subtraction exact for large logits (|x| ~ 1e4 at T = 0.5).
    log_d_s = tl.log(d_s)
    if HAS_TEACHER:
        log_d_sT = tl.log(d_sT).to(tl.float32)
        log_d_tT = tl.log(d_tT).to(tl.float32)
        # log p - log q = (t - s) / T - shift: the KL sum then never subtracts two log-probabilities of
        # size log V, where fp32 would lose ~1e-5 of a small KL.
        shift = ((m_tT - m_sT).to(tl.float64) + tl.log(d_tT / d_sT)).to(tl.float32)

    scale_ce = tl.where(has_ce, tl.load(scale_ce_ptr), 0.0)
    has_kl = tl.load(kl_mask_ptr + row) != 0
    scale_kl = tl.where(has_kl, tl.load(scale_kl_ptr), 0.0)

    # Sweep 2: the KL sum and the gradient, written where s was read.
    kl_acc = tl.full((), 0.0, tl.float64)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        if WRITE_GRAD:
            q1 = tl.where(mask, tl.exp((s - m_s) - log_d_s), 0.0)
            g = q1 * scale_ce
            g = tl.where(cols == safe_label, g - scale_ce, g)
        if HAS_TEACHER:
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            log_q = (s * inv_temp - m_sT) - log_d_sT
            log_p = (t * inv_temp - m_tT) - log_d_tT
            # Masked lanes: log_q = log_p = 0 and p = 0 contribute nothing and never overflow.
            log_q = tl.where(mask, log_q, 0.0)
            log_p = tl.where(mask, log_p, 0.0)
            p = tl.where(mask, tl.exp(log_p), 0.0)
            kl_acc += tl.sum((p * ((t - s) * inv_temp - shift)).to(tl.float64), 0)
            if WRITE_GRAD:
                g += (tl.where(mask, tl.exp(log_q), 0.0) - p) * scale_kl
        if WRITE_GRAD:
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)

    tl.store(kl_rows_ptr + row, tl.where(has_kl, kl_acc, 0.0).to(tl.float32))
    tl.store(ce_rows_ptr + row, tl.where(has_ce, (m_s - s_label) + log_d_s, 0.0))


@triton.jit
def _cosine_kernel(
    s_ptr,
    s_stride,
    t_ptr,
    t_stride,
    g_ptr,
    g_stride,
    cos_ptr,
    n_cols,
    grad_scale,
    eps,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)

    dot = 0.0
    ss = 0.0
    tt = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(s * t, 0)
        ss += tl.sum(s * s, 0)
        tt += tl.sum(t * t, 0)
    ss += eps
    tt += eps
    inv_denom = 1.0 / tl.sqrt(ss * tt)
    cos = dot * inv_denom
    tl.store(cos_ptr + row, cos)

    if WRITE_GRAD:
        # d(1 - cos)/ds = cos * s / (|s|^2 + eps) - t / sqrt((|s|^2 + eps)(|t|^2 + eps))
        a = cos / ss * grad_scale
        b = inv_denom * grad_scale
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + cols, (a * s - b * t).to(g_ptr.dtype.element_ty), mask=mask)


def _block_and_warps(n_cols: int, device: torch.device) -> tuple[int, int]:
    cap = MAX_BLOCK_CUDA if device.type == "cuda" else MAX_BLOCK_INTERPRETER
    block = min(triton.next_power_of_2(max(n_cols, 1)), cap)
    warps = 16 if block >= 4096 else 8 if block >= 1024 else 4
    return block, warps


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def kl_ce_rows_triton(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    scale_kl: torch.Tensor,
    scale_ce: torch.Tensor,
    temperature: float,
    grad_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch_impl.kl_ce_rows_torch, on the Triton kernel."""
    check_interpreted(_kl_ce_kernel, student.device)
    n_rows, n_cols = student.shape
    kl_rows = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    ce_rows = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return kl_rows, ce_rows
    student = _row_major(student)
    if grad_out is not None and grad_out.stride(-1) != 1:
        raise ValueError("grad_out must have unit stride along the vocabulary")
    teacher = _row_major(teacher) if teacher is not None else None
    block, warps = _block_and_warps(n_cols, student.device)
    _kl_ce_kernel[(n_rows,)](
        student,
        student.stride(0),
        teacher if teacher is not None else student,
        teacher.stride(0) if teacher is not None else 0,
        grad_out if grad_out is not None else student,
        grad_out.stride(0) if grad_out is not None else 0,
        labels.contiguous(),
        kl_mask.to(torch.int8).contiguous(),
        scale_kl.to(torch.float32).reshape(1),
        scale_ce.to(torch.float32).reshape(1),
        kl_rows,
        ce_rows,
        n_cols,
        1.0 / temperature,
        HAS_TEACHER=teacher is not None,
        WRITE_GRAD=grad_out is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return kl_rows, ce_rows


def cosine_rows_triton(
    student: torch.Tensor, teacher: torch.Tensor, grad_scale: float, grad_out: torch.Tensor | None
) -> torch.Tensor:
    """Same contract as torch_impl.cosine_rows_torch, on the Triton kernel."""
    check_interpreted(_cosine_kernel, student.device)
    n_rows, n_cols = student.shape
    cos = torch.zeros(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return cos
    student = _row_major(student)
    teacher = _row_major(teacher)
    if grad_out is not None and grad_out.stride(-1) != 1:
        raise ValueError("grad_out must have unit stride along the hidden dimension")
    block, warps = _block_and_warps(n_cols, student.device)
    _cosine_kernel[(n_rows,)](
        student,
        student.stride(0),
        teacher,
        teacher.stride(0),
        grad_out if grad_out is not None else student,
        grad_out.stride(0) if grad_out is not None else 0,
        cos,
        n_cols,
        grad_scale,
        COSINE_EPS,
        WRITE_GRAD=grad_out is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return cos
