"""Choosing between the Triton kernels and the torch implementation.

`backend="auto"` (the default) runs Triton on CUDA tensors and torch elsewhere. `"triton"` forces the
kernels; on CPU tensors that only works under the Triton interpreter (TRITON_INTERPRET=1 set before
triton is first imported), which is how the CPU tests exercise them. `"torch"` forces the torch
implementation on any device. The environment variable DISTIL_KERNELS_BACKEND sets the default.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from distil.kernels.torch_impl import cosine_rows_torch, kl_ce_rows_torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "DISTIL_KERNELS_BACKEND"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "torch" for these tensors; raise ValueError for a choice that cannot run."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} (argument or ${BACKEND_ENV})")
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if choice == "auto":
        return "triton" if on_cuda and triton_installed() else "torch"
    if choice == "triton":
        if not triton_installed():
            raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not on_cuda and not interpreter_requested():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return choice


def check_interpreted(kernel: object, device: torch.device) -> None:
    """Fail clearly when CPU tensors reach a kernel that was compiled for the GPU, not interpreted.

    Triton decides at decoration time; if the kernel module was imported before TRITON_INTERPRET=1 was
    set, launching on CPU tensors would crash deep inside the driver instead.
    """
    if device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            "Triton kernels were imported without TRITON_INTERPRET=1; set it before the first import of "
            "kernels.triton_impl to run them on CPU tensors"
        )


def kl_ce_rows_fn(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The per-row KL/CE primitive for a resolved backend (see torch_impl.kl_ce_rows_torch)."""
    if backend == "triton":
        from distil.kernels.triton_impl import kl_ce_rows_triton

        return kl_ce_rows_triton
    return kl_ce_rows_torch


def cosine_rows_fn(backend: str) -> Callable[..., torch.Tensor]:
    """The per-row cosine primitive for a resolved backend (see torch_impl.cosine_rows_torch)."""
    if backend == "triton":
        from distil.kernels.triton_impl import cosine_rows_triton

        return cosine_rows_triton
    return cosine_rows_torch
