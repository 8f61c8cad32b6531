"""Shared inputs and comparisons for the kernel tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from distil.kernels.dispatch import interpreter_requested

# Triton on CPU tensors needs the interpreter; conftest sets it unless the caller chose otherwise
# (TRITON_INTERPRET=0 to run the compiled-kernel test on a GPU machine).
needs_interpreter = pytest.mark.skipif(
    not interpreter_requested(), reason="TRITON_INTERPRET is off: Triton kernels cannot run on CPU tensors"
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in float64 (absolute when ||e|| is 0)."""
    a = actual.detach().double()
    e = expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, seed: int) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed {seed})"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (seed {seed})"
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol} (seed {seed})"


@dataclass
class LossCase:
    student: torch.Tensor
    teacher: torch.Tensor | None
    labels: torch.Tensor
    kl_mask: torch.Tensor
    temperature: float
    alpha_kl: float
    alpha_ce: float


def random_rows(
    n_rows: int, vocab: int, label_fraction: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with a random share of -100 rows and a random kl_mask (each may be empty)."""
    frac = random.random() if label_fraction is None else label_fraction
    labels = torch.randint(0, vocab, (n_rows,))
    labels[torch.rand(n_rows) >= frac] = -100
    kl_mask = torch.rand(n_rows) < random.uniform(0.3, 1.0)
    return labels, kl_mask


def random_case(
    dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    max_rows: int = 16,
    max_vocab: int = 300,
    scale: float | None = None,
) -> LossCase:
    """Random shapes (V never a power of two), values, temperature and weights."""
    n_rows = random.randint(1, max_rows)
    vocab = random.randint(2, max_vocab)
    if vocab & (vocab - 1) == 0:
        vocab += 1
    scale = random.choice([1.0, 5.0, 30.0]) if scale is None else scale
    student = (torch.randn(n_rows, vocab, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(n_rows, vocab, dtype=torch.float64) * scale).to(teacher_dtype)
    labels, kl_mask = random_rows(n_rows, vocab)
    return LossCase(
        student,
        teacher,
        labels,
        kl_mask,
        temperature=random.uniform(0.5, 10.0),
        alpha_kl=random.uniform(0.1, 5.0),
        alpha_ce=random.uniform(0.1, 5.0),
    )
