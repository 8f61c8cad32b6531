"""The torch implementation against torch's own loss modules, and gradcheck in float64."""

from __future__ import annotations

import random

import pytest
import torch
from kernels_test_utils import BF16_TOL, FP32_TOL, assert_close, random_case, random_rows

from distil.kernels import cosine_embedding_loss, distillation_kl_ce, fused_linear_distillation_kl_ce
from distil.kernels.reference import recipe_cosine, recipe_kl_ce


def _grad_of(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("draw", range(3))
def test_kl_ce_matches_kldivloss_and_crossentropy(seed, dtype, tol, draw):
    case = random_case(dtype, dtype)
    args = (case.teacher, case.labels, case.kl_mask, case.temperature, case.alpha_kl, case.alpha_ce)
    ours, (g_ours,) = _grad_of(lambda s: distillation_kl_ce(s, *args, backend="torch"), case.student)
    ref, (g_ref,) = _grad_of(lambda s: recipe_kl_ce(s, *args), case.student)
    for name, a, b in zip(("loss", "kl", "ce"), ours, ref, strict=True):
        assert_close(a, b.to(a.dtype), tol, name, seed)
    assert_close(g_ours, g_ref, tol, "grad student_logits", seed)


@pytest.mark.parametrize("temperature", [2.0, 3.7])  # 2.0 takes the exp(zq)^2 path for the CE softmax
@pytest.mark.parametrize("form", ["logits", "fused-linear", "bf16", "no-teacher"])
def test_sub_blocks_of_rows_match_the_recipe(seed, monkeypatch, temperature, form):
    """Rows in many small sub-blocks, some without any labelled row (their CE work is skipped): the
    losses and gradients still match the eager recipe computed in float64."""
    import distil.kernels.torch_impl as torch_impl

    n_rows, vocab, hidden = 23, 97, 16
    monkeypatch.setattr(torch_impl, "BLOCK_ELEMENTS", 3 * vocab)  # 3 rows per sub-block
    labels = torch.full((n_rows,), -100)
    labelled = [0, 4, 5, 13, 22]  # sub-blocks 2, 3, 5 and 6 have none
    labels[labelled] = torch.randint(0, vocab, (len(labelled),))
    kl_mask = torch.rand(n_rows) < 0.8
    kl_mask[0] = True
    h = torch.randn(n_rows, hidden)
    w = torch.randn(vocab, hidden) * 3 / hidden**0.5
    t_logits = torch.randn(n_rows, vocab) * 3
    teacher = None if form == "no-teacher" else t_logits
    alpha_kl = 0.0 if teacher is None else 5.0
    dtype, tol = (torch.bfloat16, BF16_TOL) if form == "bf16" else (torch.float32, FP32_TOL)

    if form == "fused-linear":

        def ours_fn(h_, w_):
            return fused_linear_distillation_kl_ce(
                h_,
                w_,
                None,
                t_logits,
                labels,
                kl_mask,
                temperature,
                alpha_kl,
                2.0,
                chunk_size=11,
                backend="torch",
            )
    else:

        def ours_fn(h_, w_):
            return distillation_kl_ce(
                (h_ @ w_.t()).to(dtype), teacher, labels, kl_mask, temperature, alpha_kl, 2.0, backend="torch"
            )

    def ref_fn(h_, w_):
        logits = (h_ @ w_.t()).to(dtype).double()
        t64 = teacher.double() if teacher is not None else None
        return recipe_kl_ce(logits, t64, labels, kl_mask, temperature, alpha_kl, 2.0)

    ours, g_ours = _grad_of(ours_fn, h, w)
    ref, g_ref = _grad_of(ref_fn, h.double(), w.double())
    for name, a, r in zip(("loss", "kl", "ce"), ours, ref, strict=True):
        assert_close(a.double(), r, tol, f"{name} ({form}, T={temperature})", seed)
    for name, a, r in zip(("hidden", "weight"), g_ours, g_ref, strict=True):
        assert_close(a.double(), r, tol, f"grad {name} ({form}, T={temperature})", seed)


@pytest.mark.parametrize("teacher_form", ["logits", "hidden", "none"])
def test_fused_linear_matches_eager_projection_and_losses(seed, teacher_form):
    dtype = torch.float32
    n_rows, vocab, hidden = random.randint(1, 16), random.randint(3, 300) | 1, random.randint(1, 64)
    h = torch.randn(n_rows, hidden, dtype=dtype)
    w = torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5
    b = torch.randn(vocab, dtype=dtype)
    th = torch.randn(n_rows, hidden + 3, dtype=dtype)
    tw = torch.randn(vocab, hidden + 3, dtype=dtype) / hidden**0.5
    tb = torch.randn(vocab, dtype=dtype)
    t_logits = th @ tw.t() + tb
    labels, kl_mask = random_rows(n_rows, vocab)
    temperature = random.uniform(0.5, 10.0)
    alpha_kl = 0.0 if teacher_form == "none" else random.uniform(0.1, 5.0)
    chunk = random.randint(1, n_rows + 2)
    teacher_kw = {"hidden": dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)}.get(teacher_form, {})
    teacher_arg = t_logits if teacher_form == "logits" else None

    def ours_fn(h_, w_, b_):
        return fused_linear_distillation_kl_ce(
            h_, w_, b_, teacher_arg, labels, kl_mask, temperature, alpha_kl, 2.0,
            chunk_size=chunk, backend="torch", **teacher_kw,
        )  # fmt: skip

    def ref_fn(h_, w_, b_):
        teacher = None if teacher_form == "none" else t_logits
        return recipe_kl_ce(h_ @ w_.t() + b_, teacher, labels, kl_mask, temperature, alpha_kl, 2.0)

    ours, g_ours = _grad_of(ours_fn, h, w, b)
    ref, g_ref = _grad_of(ref_fn, h, w, b)
    for name, a, r in zip(("loss", "kl", "ce"), ours, ref, strict=True):
        assert_close(a, r, FP32_TOL, f"{name} (chunk {chunk})", seed)
    for name, a, r in zip(("hidden", "weight", "bias"), g_ours, g_ref, strict=True):
        assert_close(a, r, FP32_TOL, f"grad {name} (chunk {chunk})", seed)


# float64 at 1e-7: the near-zero rows make the gradient ill-conditioned (|grad| ~ 1e6), so the two
# evaluation orders differ beyond 1e-10 there.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, FP32_TOL)])
def test_cosine_matches_cosineembeddingloss(seed, dtype, tol):
    n_rows, hidden = random.randint(1, 16), random.randint(1, 64)
    s = torch.randn(n_rows, hidden, dtype=dtype)
    t = torch.randn(n_rows, hidden, dtype=dtype)
    s[0] *= 1e-8  # near-zero rows exercise the eps in the norms
    t[-1] = 0.0
    ours, (g_ours,) = _grad_of(lambda x: cosine_embedding_loss(x, t, backend="torch"), s)
    ref, (g_ref,) = _grad_of(lambda x: recipe_cosine(x, t), s)
    assert_close(ours, ref, tol, "cosine loss", seed)
    assert_close(g_ours, g_ref, tol, "cosine grad", seed)


def test_gradcheck_float64(seed):
    n_rows, vocab, hidden = 5, 11, 4
    case = random_case(torch.float64, torch.float64, max_rows=6, max_vocab=13, scale=2.0)
    case.kl_mask[0] = True
    case.labels[0] = 1
    args = (case.teacher, case.labels, case.kl_mask, case.temperature, case.alpha_kl, case.alpha_ce)
    s = case.student.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: distillation_kl_ce(x, *args, backend="torch").loss, (s,))

    h = torch.randn(n_rows, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n_rows, vocab, dtype=torch.float64)
    labels, kl_mask = random_rows(n_rows, vocab, label_fraction=0.6)
    kl_mask[0] = True

    def fused(h_, w_, b_):
        return fused_linear_distillation_kl_ce(
            h_, w_, b_, t, labels, kl_mask, 2.0, 5.0, 2.0, chunk_size=2, backend="torch"
        ).loss

    assert torch.autograd.gradcheck(fused, (h, w, b))

    x = torch.randn(n_rows, hidden, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n_rows, hidden, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: cosine_embedding_loss(v, y, backend="torch"), (x,))
