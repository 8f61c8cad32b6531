"""Edge cases on both backends: extreme logits and temperatures, empty row sets, N = 0, no teacher,
gradient scaling, and the errors a caller can hit."""

from __future__ import annotations

import pytest
import torch
from kernels_test_utils import BACKENDS, BF16_TOL, FP32_TOL, assert_close

from distil.kernels import cosine_embedding_loss, distillation_kl_ce, fused_linear_distillation_kl_ce
from distil.kernels.dispatch import interpreter_requested, resolve_backend
from distil.kernels.reference import recipe_kl_ce


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 10.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_extreme_logits_stay_finite_and_exact(seed, backend, temperature, dtype, tol):
    """Logits at +-1e4 (saturated softmaxes with exact zeros) against the recipe computed in float64."""
    n_rows, vocab = 8, 301
    s = (torch.randint(0, 2, (n_rows, vocab)) * 2e4 - 1e4 + torch.randn(n_rows, vocab)).to(dtype)
    t = (torch.rand(n_rows, vocab) * 2e4 - 1e4).to(torch.float16)
    s[0] = 1e4
    t[1] = -1e4
    labels = torch.randint(0, vocab, (n_rows,))
    labels[::3] = -100
    kl_mask = torch.ones(n_rows, dtype=torch.bool)
    kl_mask[2] = False
    args = (labels, kl_mask, temperature, 5.0, 2.0)
    x = s.clone().requires_grad_()
    ours = distillation_kl_ce(x, t, *args, backend=backend)
    ours.loss.backward()
    x64 = s.double().requires_grad_()
    ref = recipe_kl_ce(x64, t.double(), *args)
    ref[0].backward()
    for name, a, b in zip(("loss", "kl", "ce"), ours, ref, strict=True):
        assert_close(a.double(), b, tol, name, seed)
    assert_close(x.grad, x64.grad.to(dtype), tol, "grad", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_labels_or_kl_give_zero_terms(seed, backend):
    s = torch.randn(6, 37, requires_grad=True)
    t = torch.randn(6, 37)
    no_labels = torch.full((6,), -100)
    all_rows = torch.ones(6, dtype=torch.bool)
    out = distillation_kl_ce(s, t, no_labels, all_rows, 2.0, 5.0, 2.0, backend=backend)
    assert out.ce.item() == 0.0 and out.kl.item() > 0.0
    assert_close(out.loss, 5.0 * out.kl, FP32_TOL, "loss without CE rows", seed)
    out.loss.backward()
    s64 = s.detach().double().requires_grad_()
    recipe_kl_ce(s64, t.double(), no_labels, all_rows, 2.0, 5.0, 2.0)[0].backward()
    assert_close(s.grad, s64.grad.float(), FP32_TOL, "grad without CE rows", seed)

    labels = torch.randint(0, 37, (6,))
    out = distillation_kl_ce(
        s.detach(), t, labels, torch.zeros(6, dtype=torch.bool), 2.0, 5.0, 2.0, backend=backend
    )
    assert out.kl.item() == 0.0 and out.ce.item() > 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_give_zero_losses_and_empty_gradients(backend):
    vocab, hidden = 30, 8
    s = torch.zeros(0, vocab, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    kl_mask = torch.zeros(0, dtype=torch.bool)
    out = distillation_kl_ce(s, torch.zeros(0, vocab), labels, kl_mask, 2.0, 5.0, 2.0, backend=backend)
    assert [v.item() for v in out] == [0.0, 0.0, 0.0]
    out.loss.backward()
    assert s.grad.shape == (0, vocab)

    h = torch.zeros(0, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True)
    out = fused_linear_distillation_kl_ce(h, w, b, None, labels, kl_mask, 2.0, 0.0, 2.0, backend=backend)
    assert [v.item() for v in out] == [0.0, 0.0, 0.0]
    out.loss.backward()
    assert h.grad.shape == (0, hidden)
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0

    x = torch.zeros(0, hidden, requires_grad=True)
    loss = cosine_embedding_loss(x, torch.zeros(0, hidden), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == (0, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlm_only_mode_without_teacher(seed, backend):
    s = torch.randn(5, 41, requires_grad=True)
    labels = torch.tensor([3, -100, 40, 0, -100])
    kl_mask = torch.ones(5, dtype=torch.bool)
    out = distillation_kl_ce(s, None, labels, kl_mask, 2.0, 0.0, 1.0, backend=backend)
    out.loss.backward()
    s_ref = s.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(s_ref, labels, ignore_index=-100)
    ref.backward()
    assert out.kl.item() == 0.0
    assert_close(out.ce, ref, FP32_TOL, "ce", seed)
    assert_close(s.grad, s_ref.grad, FP32_TOL, "grad", seed)
    with pytest.raises(ValueError, match="alpha_kl"):
        distillation_kl_ce(s, None, labels, kl_mask, 2.0, 1.0, 1.0, backend=backend)


def _small_case() -> tuple[torch.Tensor, tuple]:
    """Student logits and the remaining distillation_kl_ce arguments for a 4 x 23 case."""
    labels = torch.tensor([1, -100, 22, 5])
    kl_mask = torch.tensor([True, True, False, True])
    return torch.randn(4, 23), (torch.randn(4, 23), labels, kl_mask, 2.0, 5.0, 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_incoming_gradient_and_graph_can_rerun(seed, backend):
    s, args = _small_case()
    x1 = s.clone().requires_grad_()
    distillation_kl_ce(x1, *args, backend=backend).loss.backward()
    x3 = s.clone().requires_grad_()
    loss = distillation_kl_ce(x3, *args, backend=backend).loss * 3.0
    loss.backward(retain_graph=True)
    assert_close(x3.grad, 3.0 * x1.grad, FP32_TOL, "grad of 3 * loss", seed)
    loss.backward()
    assert_close(x3.grad, 6.0 * x1.grad, FP32_TOL, "grad after a second backward", seed)
    with torch.no_grad():
        plain = distillation_kl_ce(s, *args, backend=backend)
    assert_close(plain.loss * 3.0, loss.detach(), FP32_TOL, "loss under no_grad", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_scales_the_stored_gradient_once(seed, backend):
    s, args = _small_case()
    x_ref = s.clone().requires_grad_()
    (distillation_kl_ce(x_ref, *args, backend=backend).loss * 0.5).backward()
    x = s.clone().requires_grad_()
    loss = distillation_kl_ce(x, *args, backend=backend, inplace_backward=True).loss * 0.5
    loss.backward(retain_graph=True)
    assert_close(x.grad, x_ref.grad, FP32_TOL, "in-place backward", seed)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.zeros(2, 3)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend(None, cpu) in ("torch", "triton")
    monkeypatch.setenv("DISTIL_KERNELS_BACKEND", "torch")
    assert resolve_backend(None, cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)


def test_bad_inputs_raise_clear_errors():
    s = torch.randn(3, 10)
    labels = torch.tensor([1, -100, 2])
    kl_mask = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="labels must be in"):
        distillation_kl_ce(s, s, torch.tensor([1, 10, -100]), kl_mask, 2.0, 1.0, 1.0, backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl_ce(s, s, labels, kl_mask, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher logits must be"):
        distillation_kl_ce(s, s[:, :5], labels, kl_mask, 2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="kl_mask must be a bool"):
        distillation_kl_ce(s, s, labels, kl_mask.long(), 2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="must agree"):
        fused_linear_distillation_kl_ce(
            torch.randn(3, 4), torch.randn(10, 5), None, s, labels, kl_mask, 2.0, 1.0, 1.0
        )
    with pytest.raises(ValueError, match="not both"):
        fused_linear_distillation_kl_ce(
            torch.randn(3, 4), torch.randn(10, 4), None, s, labels, kl_mask, 2.0, 1.0, 1.0,
            teacher_hidden=torch.randn(3, 4), teacher_weight=torch.randn(10, 4),
        )  # fmt: skip
    with pytest.raises(ValueError, match="alpha_kl"):
        fused_linear_distillation_kl_ce(
            torch.randn(3, 4), torch.randn(10, 4), None, None, labels, kl_mask, 2.0, 1.0, 1.0
        )
    with pytest.raises(ValueError, match="needs teacher_weight"):
        fused_linear_distillation_kl_ce(
            torch.randn(3, 4), torch.randn(10, 4), None, None, labels, kl_mask, 2.0, 1.0, 1.0,
            teacher_hidden=torch.randn(3, 4),
        )  # fmt: skip
    with pytest.raises(ValueError, match="both be"):
        cosine_embedding_loss(torch.randn(3, 4), torch.randn(3, 5))


def test_compiled_triton_on_cuda_matches_torch_and_the_recipe(seed):
    """The compiled (not interpreted) kernels at the real vocabulary, bf16; needs a CUDA device.

    Both backends of the fused-linear form against the recipe's eager code run in fp32 on the same bf16
    inputs (this also checks the chunked weight-gradient accumulation, shared by the two backends), and
    the plain and cosine kernels against the torch implementation.
    """
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device: compiled Triton kernels cannot run here (interpreter tests cover the logic)"
        )
    if interpreter_requested():
        pytest.skip("TRITON_INTERPRET=1 is set: rerun with TRITON_INTERPRET=0 to test the compiled kernels")
    device = torch.device("cuda")
    n_rows, vocab, hidden = 3000, 30522, 768
    h = torch.randn(n_rows, hidden, device=device).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device=device) * 0.05).to(torch.bfloat16)
    b = (torch.randn(vocab, device=device) * 0.1).to(torch.bfloat16)
    t = (torch.randn(n_rows, vocab, device=device) * 5).to(torch.float16)
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    labels[torch.rand(n_rows, device=device) > 0.15] = -100
    kl_mask = torch.rand(n_rows, device=device) < 0.9
    args = (labels, kl_mask, 2.0, 5.0, 2.0)

    leaves = [x.float().requires_grad_() for x in (h, w, b)]
    ref = recipe_kl_ce(leaves[0] @ leaves[1].t() + leaves[2], t.float(), *args)
    ref[0].backward()
    for backend in ("torch", "triton"):
        ours_leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        out = fused_linear_distillation_kl_ce(*ours_leaves, t, *args, chunk_size=1024, backend=backend)
        out.loss.backward()
        for name, a, r in zip(("loss", "kl", "ce"), out, ref, strict=True):
            assert_close(a, r, BF16_TOL, f"{backend} {name}", seed)
        for name, a, r in zip(("hidden", "weight", "bias"), ours_leaves, leaves, strict=True):
            assert_close(a.grad.float(), r.grad, BF16_TOL, f"{backend} grad {name}", seed)

    s = (torch.randn(n_rows, vocab, device=device) * 5).to(torch.bfloat16)
    grads = {}
    for backend in ("torch", "triton"):
        x = s.clone().requires_grad_()
        out = distillation_kl_ce(x, t, *args, backend=backend)
        out.loss.backward()
        grads[backend] = (out, x.grad)
    for a, r in zip(grads["triton"][0], grads["torch"][0], strict=True):
        assert_close(a, r, BF16_TOL, "plain form loss", seed)
    assert_close(grads["triton"][1], grads["torch"][1], BF16_TOL, "plain form grad", seed)

    th = torch.randn(n_rows, hidden, device=device).to(torch.bfloat16)
    cos = {}
    for backend in ("torch", "triton"):
        x = h.clone().requires_grad_()
        loss = cosine_embedding_loss(x, th, backend=backend)
        loss.backward()
        cos[backend] = (loss, x.grad)
    assert_close(cos["triton"][0], cos["torch"][0], BF16_TOL, "cosine loss", seed)
    assert_close(cos["triton"][1], cos["torch"][1], BF16_TOL, "cosine grad", seed)
