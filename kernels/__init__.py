"""Fused distillation losses: Triton kernels on CUDA, torch implementations elsewhere."""
