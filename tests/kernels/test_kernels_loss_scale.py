"""Fused-loss gradients under mixed precision: fp16 / bf16 inputs, the loss multiplied by a loss scale
before backward and the gradient divided by it after (as DeepSpeed's loss scaler does), compared row by
row against the same loss in fp64, and against what plain mixed-precision autograd gives.

The fused losses make their gradient in the forward, before the loss scale is known. The cases here are
the ones that broke that in fp16: a student close to its teacher (q - p tiny), rows with a KL term and no
label, many rows (every gradient divided by N). Each comparison is element-wise, on rows normalised by their
largest reference value, with tolerances per dtype. The loss scale is 2^16 (DeepSpeed's initial one), or
the largest power of two below it that keeps the true gradients times the scale under 2^14, where a dynamic
loss scaler would settle (at 2^16 they would overflow for any method).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernels_test_utils import needs_interpreter

from distil.kernels import cosine_embedding_loss, distillation_kl_ce, fused_linear_distillation_kl_ce
from distil.kernels.dispatch import interpreter_requested
from distil.kernels.reference import recipe_cosine, recipe_kl_ce

# Per dtype: (rtol, atol) on rows normalised to a largest |value| of 1. fp16 keeps 11 significant bits
# (eps 9.8e-4), bf16 8 (eps 7.8e-3): about two units in the last place.
TOLERANCES = {torch.float16: (1e-2, 2e-3), torch.bfloat16: (5e-2, 1.6e-2)}
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# (backend, device): Triton runs under the interpreter on CPU tensors, compiled on a GPU.
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("triton", "cpu"), id="triton-interpreted", marks=needs_interpreter),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or interpreter_requested(),
        reason="compiled Triton needs a CUDA device and TRITON_INTERPRET=0")),
]
T, ALPHA_KL, ALPHA_CE = 2.0, 5.0, 2.0


def settled_loss_scale(*reference_grads: torch.Tensor) -> float:
    largest = max(g.abs().max().item() for g in reference_grads)
    return min(2.0**16, 2.0 ** math.floor(math.log2(2.0**14 / largest)))


def _normalised_rows(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    return x / scale, ref / scale


def _row_errors(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, e = _normalised_rows(x, ref)
    return (a - e).abs().amax(dim=1)


def _assert_rows_close(ours: torch.Tensor, ref: torch.Tensor, autograd: torch.Tensor, dtype: torch.dtype,
                       what: str, seed: int) -> None:
    """Element-wise within the dtype's tolerance, and no row worse than plain autograd's (plus the atol)."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite gradient (seed {seed})"
    rtol, atol = TOLERANCES[dtype]
    a, e = _normalised_rows(ours, ref)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}, {dtype} (seed {seed}, replay with KERNELS_TEST_SEED): {m}")
    worse = _row_errors(ours, ref) > _row_errors(autograd, ref) + atol
    assert not worse.any(), (f"{what}: rows {worse.nonzero().flatten().tolist()[:10]} worse than plain "
                             f"mixed-precision autograd (seed {seed})")


def _near_teacher_case(n_rows: int, vocab: int, device: str = "cpu", label_fraction: float = 0.15):
    """A student close to its teacher (1 % logit noise), KL on every row, labels on a few rows only."""
    teacher = torch.randn(n_rows, vocab, dtype=torch.float64) * 3.0
    student = teacher + 0.01 * torch.randn(n_rows, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n_rows,))
    labels[torch.rand(n_rows) >= label_fraction] = -100
    labels[0] = 1  # at least one labelled row, and most rows KL-only
    kl_mask = torch.ones(n_rows, dtype=torch.bool)
    return student.to(device), teacher.to(device), labels.to(device), kl_mask.to(device)


def _grads_under_scale(inputs: list[torch.Tensor], loss_fn, scale: float) -> list[torch.Tensor]:
    xs = [x.clone().requires_grad_(True) for x in inputs]
    (loss_fn(*xs) * scale).backward()
    return [x.grad.double() / scale for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_ce_gradient_survives_the_loss_scale(seed, dtype, backend):
    backend, device = backend
    student64, teacher64, labels, kl_mask = _near_teacher_case(48, 2003, device)
    student, teacher = student64.to(dtype), teacher64.to(dtype)
    ref_x = student.double().requires_grad_(True)  # the same (rounded) inputs, exact arithmetic
    recipe_kl_ce(ref_x, teacher.double(), labels, kl_mask, T, ALPHA_KL, ALPHA_CE)[0].backward()
    scale = settled_loss_scale(ref_x.grad)
    # a scale the case can meet in training: 2^13 where a gradient just exceeds 1 (KERNELS_TEST_SEED=1596718355
    # gave one in CI), 2^14-2^16 otherwise; the claims are the row comparisons below
    assert scale >= 2.0**12

    (ours,) = _grads_under_scale([student], lambda x: distillation_kl_ce(
        x, teacher, labels, kl_mask, T, ALPHA_KL, ALPHA_CE, backend=backend).loss, scale)
    (autograd,) = _grads_under_scale([student], lambda x: recipe_kl_ce(  # fp32 math, low-precision grads
        x.float(), teacher.float(), labels, kl_mask, T, ALPHA_KL, ALPHA_CE)[0], scale)
    _assert_rows_close(ours, ref_x.grad, autograd, dtype, "d loss / d student logits", seed)
    kl_only = (labels == -100) & (ref_x.grad != 0).any(dim=1)  # (in bf16 a row can round to its teacher)
    assert kl_only.sum() > 10 and (ours[kl_only] != 0).any(dim=1).all(), f"a KL-only row lost its gradient ({seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_ce_inplace_backward_matches_the_copying_one(seed, dtype):
    student64, teacher64, labels, kl_mask = _near_teacher_case(32, 1001)
    grads = [_grads_under_scale([student64.to(dtype)], lambda x, inplace=inplace: distillation_kl_ce(
        x, teacher64.to(dtype), labels, kl_mask, T, ALPHA_KL, ALPHA_CE, inplace_backward=inplace).loss,
        2.0**16)[0] for inplace in (False, True)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_gradients_survive_the_loss_scale(seed, dtype, backend):
    backend, device = backend
    n_rows, hidden, vocab = 40, 32, 1501
    h, w, b = (torch.randn(n_rows, hidden, dtype=torch.float64).to(device, dtype),
               (torch.randn(vocab, hidden, dtype=torch.float64) * 0.3).to(device, dtype),
               (torch.randn(vocab, dtype=torch.float64) * 0.1).to(device, dtype))
    noise = 0.01 * torch.randn(n_rows, hidden, dtype=torch.float64).to(device)
    t_h = (h.double() + noise).to(dtype)  # a nearby teacher
    _, _, labels, kl_mask = _near_teacher_case(n_rows, vocab, device)
    # The reference: exact arithmetic from the logits as computed in the low precision (the forward's
    # rounding is the dtype's, the same for every method; what is compared is the gradient's precision).
    logits = torch.addmm(b, h, w.t()).double().requires_grad_(True)
    teacher_logits = torch.addmm(b, t_h, w.t()).double()
    recipe_kl_ce(logits, teacher_logits, labels, kl_mask, T, ALPHA_KL, ALPHA_CE)[0].backward()
    g = logits.grad
    refs = [g @ w.double(), g.t() @ h.double(), g.sum(dim=0)]
    scale = settled_loss_scale(*refs)

    ours = _grads_under_scale([h, w, b], lambda hh, ww, bb: fused_linear_distillation_kl_ce(
        hh, ww, bb, None, labels, kl_mask, T, ALPHA_KL, ALPHA_CE, teacher_hidden=t_h, teacher_weight=w,
        teacher_bias=b, chunk_size=16, backend=backend).loss, scale)
    autograd = _grads_under_scale([h, w, b], lambda hh, ww, bb: recipe_kl_ce(  # low-precision matmul, fp32 loss
        torch.addmm(bb, hh, ww.t()).float(), teacher_logits.float(), labels, kl_mask, T, ALPHA_KL,
        ALPHA_CE)[0], scale)
    _assert_rows_close(ours[0], refs[0], autograd[0], dtype, "d loss / d hidden", seed)
    _assert_rows_close(ours[1], refs[1], autograd[1], dtype, "d loss / d weight (rows: vocabulary)", seed)
    _assert_rows_close(ours[2][None], refs[2][None], autograd[2][None], dtype, "d loss / d bias", seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_gradient_survives_the_loss_scale(seed, dtype, backend):
    backend, device = backend
    n_rows = 96 if device == "cpu" and backend == "triton" else 512  # the interpreter: one row per program
    t64 = (torch.randn(n_rows, 64, dtype=torch.float64) * 4.0).to(device)
    s, t = (t64 + 0.01 * torch.randn_like(t64)).to(dtype), t64.to(dtype)
    ref_x = s.double().requires_grad_(True)
    recipe_cosine(ref_x, t.double()).backward()
    scale = settled_loss_scale(ref_x.grad)
    (ours,) = _grads_under_scale([s], lambda x: cosine_embedding_loss(x, t, backend=backend), scale)
    (autograd,) = _grads_under_scale([s], lambda x: recipe_cosine(x.float(), t.float()), scale)
    _assert_rows_close(ours, ref_x.grad, autograd, dtype, "d cosine loss / d student hidden", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_are_refused_on_every_backend(backend):
    backend, device = backend
    student = torch.randn(4, 50, device=device, requires_grad=True)
    no_kl = torch.zeros(4, dtype=torch.bool, device=device)
    for bad in (50, -2):
        labels = torch.tensor([1, -100, bad, 3], device=device)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 50\) or -100"):
            distillation_kl_ce(student, None, labels, no_kl, 1.0, 0.0, 1.0, backend=backend)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 50\) or -100"):
            fused_linear_distillation_kl_ce(torch.randn(4, 8, device=device), torch.randn(50, 8, device=device),
                                            None, None, labels, no_kl,
                                            1.0, 0.0, 1.0, backend=backend)
