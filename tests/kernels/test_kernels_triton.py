"""The Triton kernels (under TRITON_INTERPRET=1 on CPU tensors) against the torch implementation."""

from __future__ import annotations

import random

import pytest
import torch
from kernels_test_utils import BF16_TOL, FP32_TOL, assert_close, needs_interpreter, random_case, random_rows

from distil.kernels import cosine_embedding_loss, distillation_kl_ce, fused_linear_distillation_kl_ce

pytestmark = needs_interpreter

TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL, torch.float16: BF16_TOL}


def _both_backends(fn, *inputs):
    """fn(backend, *leaves) under each backend -> {backend: (outputs, grads)}."""
    results = {}
    for backend in ("torch", "triton"):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(backend, *leaves)
        (out[0] if isinstance(out, tuple) else out).backward()
        results[backend] = (out, [x.grad for x in leaves])
    return results


def _check(results, tol, names, seed):
    (out_torch, g_torch), (out_triton, g_triton) = results["torch"], results["triton"]
    outs_torch = out_torch if isinstance(out_torch, tuple) else (out_torch,)
    outs_triton = out_triton if isinstance(out_triton, tuple) else (out_triton,)
    for name, a, b in zip(("loss", "kl", "ce"), outs_triton, outs_torch, strict=False):
        assert_close(a, b, tol, f"triton {name}", seed)
    for name, a, b in zip(names, g_triton, g_torch, strict=True):
        assert a.dtype == b.dtype, f"grad {name} dtype {a.dtype} != {b.dtype}"
        assert_close(a, b, tol, f"triton grad {name}", seed)


@pytest.mark.parametrize(
    "dtype,teacher_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
     (torch.float16, torch.float16)],
)  # fmt: skip
@pytest.mark.parametrize("draw", range(2))
def test_kl_ce_triton_matches_torch(seed, dtype, teacher_dtype, draw):
    case = random_case(dtype, teacher_dtype)
    args = (case.teacher, case.labels, case.kl_mask, case.temperature, case.alpha_kl, case.alpha_ce)
    results = _both_backends(lambda be, s: distillation_kl_ce(s, *args, backend=be), case.student)
    _check(results, TOL[dtype], ["student_logits"], seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden", "none"])
def test_fused_linear_triton_matches_torch(seed, dtype, teacher_form):
    n_rows, vocab, hidden = random.randint(1, 16), random.randint(3, 300) | 1, random.randint(1, 64)
    h = torch.randn(n_rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) * 2 / hidden**0.5).to(dtype)
    b = torch.randn(vocab).to(dtype)
    th = torch.randn(n_rows, hidden).to(torch.bfloat16)
    tw = (torch.randn(vocab, hidden) * 2 / hidden**0.5).to(torch.bfloat16)
    labels, kl_mask = random_rows(n_rows, vocab)
    temperature = random.uniform(0.5, 10.0)
    alpha_kl = 0.0 if teacher_form == "none" else 5.0
    chunk = random.randint(1, n_rows + 1)
    t_logits = (th @ tw.t()) if teacher_form == "logits" else None
    kw = dict(teacher_hidden=th, teacher_weight=tw) if teacher_form == "hidden" else {}

    def run(backend, h_, w_, b_):
        return fused_linear_distillation_kl_ce(
            h_, w_, b_, t_logits, labels, kl_mask, temperature, alpha_kl, 2.0,
            chunk_size=chunk, backend=backend, **kw,
        )  # fmt: skip

    _check(_both_backends(run, h, w, b), TOL[dtype], ["hidden", "weight", "bias"], seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_triton_matches_torch(seed, dtype):
    n_rows, hidden = random.randint(1, 16), random.randint(1, 300)
    s = torch.randn(n_rows, hidden).to(dtype)
    t = torch.randn(n_rows, hidden).to(dtype)
    s[0] = 0.0  # a zero row: cos is 0 by the eps in the norms
    results = _both_backends(lambda be, x: cosine_embedding_loss(x, t, backend=be), s)
    _check(results, TOL[dtype], ["student_hidden"], seed)


def test_kl_ce_triton_full_bert_vocabulary(seed):
    """V = 30522 (not a power of two): many column blocks and a ragged last block."""
    n_rows, vocab, dtype = 3, 30522, torch.bfloat16
    s = (torch.randn(n_rows, vocab) * 8).to(dtype)
    t = (torch.randn(n_rows, vocab) * 8).to(torch.float16)
    labels = torch.tensor([vocab - 1, -100, 7])
    kl_mask = torch.tensor([True, True, False])
    args = (t, labels, kl_mask, 2.0, 5.0, 2.0)
    results = _both_backends(lambda be, x: distillation_kl_ce(x, *args, backend=be), s)
    _check(results, TOL[dtype], ["student_logits"], seed)
