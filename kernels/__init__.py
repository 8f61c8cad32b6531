"""Fused distillation losses: Triton kernels on CUDA, torch implementations elsewhere.

Public API (see each function's docstring):
- distillation_kl_ce(student_logits, teacher_logits, labels, kl_mask, T, alpha_kl, alpha_ce) -> DistillLoss
- fused_linear_distillation_kl_ce(student_hidden, weight, bias, teacher_logits, labels, kl_mask, T,
  alpha_kl, alpha_ce, *, teacher_hidden=None, teacher_weight=None, teacher_bias=None, chunk_size=None)
- cosine_embedding_loss(student_hidden, teacher_hidden) -> scalar
All take an optional keyword `backend="auto"|"triton"|"torch"` (default from $DISTIL_KERNELS_BACKEND,
else "auto": Triton for CUDA tensors, torch otherwise).
"""

import sys

if __name__ == "kernels":
    # This folder was found as a top-level `kernels` because the clone's root is on sys.path (`python -m ...`
    # or `python -c ...` started there). The name belongs to Hugging Face's `kernels` package, which
    # transformers imports; ours is `distil.kernels`. Hand the import over to the installed package (or fail
    # as if this folder were not there), so the clone's root never shadows it.
    import importlib
    import os

    _clone = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    sys.path[:] = [entry for entry in _path if os.path.abspath(entry or os.curdir) != _clone]
    del sys.modules["kernels"]
    try:
        # The import system then takes sys.modules["kernels"] as the result of this import.
        sys.modules["kernels"] = importlib.import_module("kernels")
    finally:
        sys.path[:] = _path
else:
    from distil.kernels.cosine import cosine_embedding_loss
    from distil.kernels.fused_linear import fused_linear_distillation_kl_ce
    from distil.kernels.kl_ce import DistillLoss, distillation_kl_ce

__all__ = ["DistillLoss", "cosine_embedding_loss", "distillation_kl_ce", "fused_linear_distillation_kl_ce"]
