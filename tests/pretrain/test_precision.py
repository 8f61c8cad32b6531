"""The recipe's fp16 path, as close as the CPU permits, checked against fp32.

DeepSpeed's CPU accelerator has no fp16 (a config asking for it stops with one error line), so the fp16
training step is reproduced here the way DeepSpeed's fp16 optimizer runs it: fp32 master weights, an fp16
copy of the student for forward and backward, the teacher in fp16, the loss multiplied by the loss scale
before backward, gradients unscaled in fp32, a step skipped and the scale halved on overflow, clipping, AdamW
on the masters, from a student initialised from its teacher's layers. The fp16 run must follow the fp32
one: the same losses and the same weight updates, tensor by tensor, to within fp16's precision.
(The element-wise checks that fail when small fp16 gradients are lost are the kernel tests in
tests/kernels/test_kernels_loss_scale.py; at this model's size Adam's normalisation hides such a loss.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import tiny_bert

from distil.common.errors import UserError
from distil.pretrain.config import LossConfig, StudentConfig
from distil.pretrain.ds_config import check_precision_supported
from distil.pretrain.losses import DistillationObjective, teacher_outputs
from distil.pretrain.models import build_student

VOCAB, STEPS, LOSS_SCALE = 2000, 8, 2.0**16


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (8, 64), generator=g)
        mask = torch.ones_like(ids)
        labels = torch.full_like(ids, -100)
        chosen = torch.rand(ids.shape, generator=g) < 0.15
        labels[chosen] = ids[chosen]
        ids = torch.where(chosen, torch.full_like(ids, 4), ids)
        yield ids, mask, labels


def _train(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """(initial weights, final fp32 master weights, losses) after STEPS mixed-precision steps in `dtype`."""
    teacher = tiny_bert(vocab=VOCAB, layers=4, hidden=32)
    student, _ = build_student(teacher, StudentConfig(dropout=0.0, attention_dropout=0.0))
    cfg = LossConfig()  # the recipe: T 2, alphas 5 / 2 / 1, KL over every token
    master = DistillationObjective(student, teacher, cfg)
    initial = {k: v.detach().clone() for k, v in master.state_dict().items()}
    working = copy.deepcopy(master).to(dtype)
    working.train()
    teacher = teacher.to(dtype)
    working._teacher = [teacher]
    opt = torch.optim.AdamW(master.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    scale = LOSS_SCALE if dtype == torch.float16 else 1.0
    losses = []
    for ids, mask, labels in _batches(STEPS):
        with torch.no_grad():
            for w, m in zip(working.parameters(), master.parameters(), strict=True):
                w.copy_(m)
        out = working(ids, mask, labels, teacher_outputs(teacher, ids, mask, labels, cfg))
        working.zero_grad(set_to_none=True)
        (out.loss * scale).backward()
        grads = [w.grad.float() / scale if w.grad is not None else None for w in working.parameters()]
        if not all(torch.isfinite(g).all() for g in grads if g is not None):
            scale /= 2  # as the dynamic loss scaler: skip the step
            continue
        for m, g in zip(master.parameters(), grads, strict=True):
            m.grad = g
        torch.nn.utils.clip_grad_norm_(master.parameters(), 5.0)
        opt.step()
        losses.append(out.loss.item())
    return initial, {k: v.detach().clone() for k, v in master.state_dict().items()}, losses


@pytest.mark.slow
def test_fp16_training_steps_follow_fp32():
    initial, fp32, losses32 = _train(torch.float32)
    _, fp16, losses16 = _train(torch.float16)
    assert len(losses16) == STEPS, "the fp16 run skipped steps: its loss scale overflowed"
    torch.testing.assert_close(torch.tensor(losses16), torch.tensor(losses32), rtol=1e-2, atol=1e-3)
    # Weight updates, tensor by tensor: the fp16 run must move the weights as fp32 does.
    updates = {name: (fp32[name] - start, fp16[name] - start) for name, start in initial.items()
               if start.is_floating_point()}
    largest = max(d32.norm() for d32, _ in updates.values())
    for name, (d32, d16) in updates.items():
        if d32.norm() < 1e-4 * largest:  # e.g. attention key biases: no gradient in exact arithmetic
            continue
        err = ((d16 - d32).norm() / d32.norm()).item()
        assert err < 0.1, f"{name}: fp16 update differs from fp32's by {err:.3f} (relative)"


def test_fp16_on_deepspeeds_cpu_accelerator_is_one_error_line(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(UserError, match=r"engine.precision=fp16 .* cpu accelerator: use bf16 or fp32"):
        check_precision_supported("fp16")
    check_precision_supported("bf16")
    check_precision_supported("fp32")
