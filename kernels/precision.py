"""Gradients that survive fp16: made in the forward, before the loss scale is known.

The fused losses write their gradient during the forward pass, in the input's dtype, and backward only
multiplies it by the incoming gradient (under mixed precision: the loss scale, e.g. 2^16). In fp16 the
per-logit gradients of a student close to its teacher, alpha * T * (q - p) / N, are far below fp16's
smallest subnormal (6e-8) and would be stored as 0 before the loss scale could lift them.

So, for fp16 inputs, gradients are stored pre-multiplied by a power of two chosen from a bound of their
size (every element of the stored gradient then lies within [-2^14, 2^14]: fp16's full precision, no
overflow), and backward multiplies by `incoming / prescale` in fp32, chunk by chunk, before casting back:
the result is what plain mixed-precision autograd gives (the true gradient times the loss scale, rounded
once to fp16), without an fp32 copy of the whole buffer. bf16 has fp32's exponent range and needs none of
this; fp32 and fp64 are untouched (prescale 1).
"""

from __future__ import annotations

import torch

FP16_TARGET = 2.0**14  # the largest stored element: fp16's max is 65504 (about 2^16), so 4x headroom
UNSCALE_CHUNK_ELEMENTS = 1 << 22  # rows of fp32 work per backward step: 16 MiB


def needs_prescale(dtype: torch.dtype) -> bool:
    return dtype == torch.float16


def prescale_for(dtype: torch.dtype, bound: torch.Tensor) -> torch.Tensor:
    """A power of two S (fp64 0-dim tensor on bound's device) with S * bound <= 2^14; 1 unless fp16.

    `bound` bounds the magnitude of every gradient element; computed on the device, no host sync.
    """
    one = torch.ones((), dtype=torch.float64, device=bound.device)
    if not needs_prescale(dtype):
        return one
    bound = bound.to(torch.float64)
    scale = torch.exp2(torch.floor(torch.log2(FP16_TARGET / bound.clamp(min=1e-300))))
    return torch.where(bound > 0, scale.clamp(max=2.0**120), one)


def unscale(grad: torch.Tensor, incoming: torch.Tensor, prescale: torch.Tensor, *, inplace: bool,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """grad * incoming / prescale, computed in fp32 (fp64 for fp64) a block of rows at a time.

    inplace: into `grad` itself (its dtype); otherwise into a new tensor of `out_dtype` (default grad's).
    """
    dtype = out_dtype or grad.dtype
    work_dtype = torch.float64 if torch.float64 in (grad.dtype, dtype) else torch.float32
    factor = (incoming.to(torch.float64) / prescale).to(work_dtype)
    out = grad if inplace else torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if grad.numel() == 0:
        return out
    rows = grad.reshape(grad.shape[0], -1) if grad.dim() > 1 else grad.reshape(-1, 1)
    target = out.reshape(rows.shape)
    step = max(1, UNSCALE_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        target[block] = rows[block].to(work_dtype) * factor
    return out
