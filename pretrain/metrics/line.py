"""What the trainer measures for its metrics lines: each micro-batch's counts and FLOPs for the window, the
gradient norm where DeepSpeed keeps none, and the metrics of one log line (metrics.py sums the window over
ranks and writes the line)."""

from __future__ import annotations

from typing import Any

import torch

from distil.pretrain.checkpoint.state import Counters
from distil.pretrain.config import LossConfig
from distil.pretrain.losses import projection_rows
from distil.pretrain.metrics.flops import FlopModel
from distil.pretrain.metrics.window import WindowTotals


def batch_counts(batch: dict[str, torch.Tensor], flop_model: FlopModel, loss: LossConfig,
                 mode: str) -> tuple[int, int, int, float]:
    """Sequences, real tokens, masked tokens and FLOPs, from the CPU copy of the batch (no device sync)."""
    mask, labels = batch["attention_mask"], batch["labels"]
    tokens = int(mask.sum())
    masked = int((labels != -100).sum())
    rows = int(projection_rows(mask, labels, loss, mode).sum())
    flops = flop_model.micro_step(mask.numel(), mask.shape[1], rows)
    return mask.shape[0], tokens, masked, flops


def grad_norm(module: torch.nn.Module) -> float:
    """2-norm of the (already all-reduced) gradients before the optimizer step, without ZeRO."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def line_metrics(totals: WindowTotals, engine: Any, counters: Counters, own_grad_norm: float | None,
                 peak_tflops: float | None, world_size: int, stream: Any) -> dict[str, float]:
    """One metrics line (rank 0): the window's losses and throughput, the engine's learning rate, gradient
    norm (`own_grad_norm` where the engine keeps none) and loss scale, MFU when the chip's peak is known,
    and the input the stream skipped."""
    dt, flops = totals.seconds, totals.flops
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = own_grad_norm
    optimizer = engine.optimizer
    metrics: dict[str, float] = {
        **totals.losses,
        "lr": float(engine.get_lr()[0]),
        "grad_norm": float(norm) if norm is not None else float("nan"),
        "loss_scale": float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 1.0))),
        "tokens_per_s": totals.tokens / dt,
        "sequences_per_s": totals.sequences / dt,
        "masked_tokens": totals.masked,
        "tflops_per_s": flops / dt / 1e12,
        "skipped_steps": float(counters.skipped_steps),
        "rollbacks": float(counters.rollbacks),
        "epoch": float(counters.epoch),
    }
    if peak_tflops:
        metrics["mfu"] = flops / dt / (peak_tflops * 1e12 * world_size)
    stats = stream.stats() if hasattr(stream, "stats") else {}
    for key in ("skipped_samples", "skipped_shards"):  # damaged input, skipped and counted (read.py)
        if key in stats:
            metrics[key] = float(stats[key])
    return metrics
