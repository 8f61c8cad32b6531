"""Torch implementation of the per-row loss and gradient computations.

These mirror the Triton kernels in `triton_impl.py` operation for operation (same inputs, same outputs,
gradients written in the forward), so the two backends are interchangeable and testable against each
other. Arithmetic runs in fp32, or fp64 for fp64 inputs (gradcheck).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(softmax(x), row max m, row sum d of exp(x - m) in fp64), so log softmax(x) = x - m - log d."""
    m = x.amax(dim=-1, keepdim=True)
    e = (x - m).exp_()
    d = e.sum(dim=-1, keepdim=True, dtype=torch.float64)
    return e.div_(d.to(e.dtype)), m, d


def kl_shift(m_p: torch.Tensor, d_p: torch.Tensor, m_q: torch.Tensor, d_q: torch.Tensor) -> torch.Tensor:
    """log p - log q = (t - s) / T - shift per row, with shift = (m_p - m_q) + log(d_p / d_q).

    Written this way the KL sum never subtracts two log-probabilities of size log V, and with the sums
    d in fp64 a small KL (close distributions at high T) keeps ~1e-7 relative accuracy instead of fp32's
    ~1e-5; the Triton kernel computes the same quantities.
    """
    return (m_p - m_q).to(torch.float64) + torch.log(d_p / d_q)


def kl_ce_rows_torch(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kl_mask: torch.Tensor,
    scale_kl: torch.Tensor,
    scale_ce: torch.Tensor,
    temperature: float,
    grad_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(p_t || q_s) at temperature T (not yet times T^2) and CE, each 0 on rows it skips.

    scale_kl / scale_ce are the gradient factors d loss / d (per-row KL sum) / T and d loss / d CE-row,
    i.e. alpha_kl * T / n_kl and alpha_ce / n_ce. When grad_out is given the gradient of the loss with
    respect to `student` is written into it; it may be `student` itself (the fused-linear form reuses the
    logits buffer).
    """
    cdt = compute_dtype(student.dtype)
    s = student.to(cdt)
    valid = labels != -100
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    log_q1 = torch.log_softmax(s, dim=-1)
    ce_rows = torch.where(valid, -log_q1.gather(1, safe_labels).squeeze(1), 0.0)
    grad = None
    if grad_out is not None:
        grad = log_q1.exp_()
        grad.scatter_add_(1, safe_labels, -valid.to(cdt).unsqueeze(1))
        grad.mul_(torch.where(valid, scale_ce.to(cdt), 0.0).unsqueeze(1))
    del log_q1
    if teacher is None:
        kl_rows = torch.zeros_like(ce_rows)
    else:
        t = teacher.to(cdt)
        q, m_q, d_q = _softmax_parts(s / temperature)
        p, m_p, d_p = _softmax_parts(t / temperature)
        shift = kl_shift(m_p, d_p, m_q, d_q).to(cdt)
        kl_row_sums = (p * ((t - s) / temperature - shift)).sum(dim=-1, dtype=torch.float64)
        kl_rows = torch.where(kl_mask, kl_row_sums.to(cdt), 0.0)
        if grad is not None:
            q_minus_p = q.sub_(p)
            grad.add_(q_minus_p.mul_(torch.where(kl_mask, scale_kl.to(cdt), 0.0).unsqueeze(1)))
    if grad_out is not None:
        grad_out.copy_(grad)
    return kl_rows, ce_rows


COSINE_EPS = 1e-12  # torch's cosine_embedding_loss adds this to each squared norm


def cosine_rows_torch(
    student: torch.Tensor, teacher: torch.Tensor, grad_scale: float, grad_out: torch.Tensor | None
) -> torch.Tensor:
    """Per-row cos(s, t) with torch's eps semantics: dot / sqrt((|s|^2 + eps) * (|t|^2 + eps)).

    When grad_out is given, writes grad_scale * d(1 - cos) / ds, row by row, into it.
    """
    cdt = compute_dtype(student.dtype)
    s = student.to(cdt)
    t = teacher.to(cdt)
    dot = (s * t).sum(dim=-1)
    ss = (s * s).sum(dim=-1) + COSINE_EPS
    tt = (t * t).sum(dim=-1) + COSINE_EPS
    inv_denom = torch.rsqrt(ss * tt)
    cos = dot * inv_denom
    if grad_out is not None:
        grad = (cos / ss).unsqueeze(1) * s - inv_denom.unsqueeze(1) * t
        grad_out.copy_(grad * grad_scale)
    return cos
