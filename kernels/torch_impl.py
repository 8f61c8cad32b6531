"""Torch implementation of the per-row loss and gradient computations.

These have the contract of the Triton kernels in `triton_impl.py` (same inputs, same outputs, gradients
written in the forward) and compute the same quantities, so the two backends are interchangeable and
testable against each other. Arithmetic runs in fp32, or fp64 for fp64 inputs (gradcheck).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Rows are handled in sub-blocks of about this many values, so that the element-wise passes of one
# sub-block run on work buffers that stay in cache instead of streaming [rows, V] temporaries through
# memory (on CPU that was most of the loss's time). 2**18 fp32 values are 1 MiB per buffer.
BLOCK_ELEMENTS = 1 << 18


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

    With zq = (s - max s) / T and zt = (t - max t) / T (both <= 0, so exp never overflows),
    d_q = sum exp(zq), d_p = sum exp(zt), p = exp(zt) / d_p, q = exp(zq) / d_q:
        KL   = sum p * (zt - zq - log(d_p / d_q))     (= sum p * (log p - log q))
        CE   = log sum exp(s - max s) - (s[label] - max s)
        d/ds = scale_kl * (q - p) + scale_ce * (softmax(s) - onehot(label))
    Written this way the KL sum never subtracts two log-probabilities of size log V. The normalisers d_p
    and d_q are summed in fp64, as in the Triton kernel: with fp32 sums the KL and q - p of close
    distributions (high T) lose ~1e-5.
    The CE work (softmax at T = 1) is done only for sub-blocks with labelled rows; at T = 2 (the
    recipe's) its exponentials are exp(zq)^2 rather than a second exp.
    """
    cdt = compute_dtype(student.dtype)
    n_rows, vocab = student.shape
    device = student.device
    valid = labels != -100
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    ce_scale = torch.where(valid, scale_ce.to(cdt), 0.0).unsqueeze(1)
    kl_scale = torch.where(kl_mask, scale_kl.to(cdt), 0.0).unsqueeze(1)
    ce_rows = torch.zeros(n_rows, dtype=cdt, device=device)
    kl_rows = torch.zeros(n_rows, dtype=cdt, device=device)
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    n_blocks = -(-n_rows // step)
    # Which sub-blocks hold a labelled row, read to the host once for all of them.
    padded = torch.zeros(n_blocks * step, dtype=torch.bool, device=device)
    padded[:n_rows] = valid
    block_has_ce = padded.view(n_blocks, step).any(dim=1).tolist()
    n_work = 4 if teacher is not None else 1
    work = [torch.empty(min(step, n_rows), vocab, dtype=cdt, device=device) for _ in range(n_work)]
    write_direct = grad_out is not None and grad_out.dtype == cdt
    squared = temperature == 2.0
    inv_t = 1.0 / temperature
    for block, r0 in enumerate(range(0, n_rows, step)):
        r1 = min(r0 + step, n_rows)
        rows = slice(r0, r1)
        buf = [w[: r1 - r0] for w in work]
        s = student[rows].to(cdt)
        m = s.amax(dim=1, keepdim=True)
        has_ce = block_has_ce[block]
        if teacher is not None:
            zq, eq, zt, ep = buf
            t = teacher[rows].to(cdt)
            torch.add(t, t.amax(dim=1, keepdim=True), alpha=-1.0, out=zt).mul_(inv_t)
            torch.exp(zt, out=ep)
            torch.add(s, m, alpha=-1.0, out=zq).mul_(inv_t)
            torch.exp(zq, out=eq)
            d_p = ep.sum(dim=1, keepdim=True, dtype=torch.float64)
            d_q = eq.sum(dim=1, keepdim=True, dtype=torch.float64)
            # zt - zq - shift = log p - log q: the fp32 sum then never cancels two large values.
            shift = torch.log(d_p / d_q)
            kl = zt.sub_(zq).sub_(shift.to(cdt)).mul_(ep).sum(dim=1, keepdim=True) / d_p
            kl_rows[rows] = kl.squeeze(1)
            e = zq  # free now: the T = 1 exponentials go here
        else:
            e = buf[0]
        if has_ce:
            if squared and teacher is not None:
                torch.mul(eq, eq, out=e)
            else:
                torch.sub(s, m, out=e).exp_()
            d = e.sum(dim=1, keepdim=True)
            z_label = s.gather(1, safe_labels[rows]) - m
            ce_rows[rows] = (d.log() - z_label).squeeze(1)
        if grad_out is None:
            continue
        g = grad_out[rows] if write_direct else (zt if teacher is not None else e)
        if teacher is not None:
            row_kl = kl_scale[rows]
            torch.mul(eq, row_kl / d_q.to(cdt), out=g).addcmul_(ep, -row_kl / d_p.to(cdt))
            if has_ce:
                g.addcmul_(e, ce_scale[rows] / d)
        elif has_ce:
            torch.mul(e, ce_scale[rows] / d, out=g)
        else:
            g.zero_()
        g.scatter_add_(1, safe_labels[rows], -ce_scale[rows])
        if not write_direct:
            grad_out[rows].copy_(g)
    return torch.where(kl_mask, kl_rows, 0.0), torch.where(valid, ce_rows, 0.0)


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
