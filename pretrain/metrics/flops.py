"""The FLOP model behind the tflops_per_s and MFU metrics, and the table of peak TFLOP/s per device.

Counts 2 FLOPs per multiply-add; the trained model costs 3x its forward (forward + backward), the teacher 1x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distil.pretrain.config import TrainConfig


def encoder_flops_per_token(hidden: int, ffn: int, layers: int, seq_len: int) -> float:
    """Forward FLOPs per token of a BERT encoder: 2 per multiply-add.

    Per layer: Q, K, V and output projections 4*H*H, FFN 2*H*F, attention scores and weighted sum 2*L*H
    (L = padded sequence length, since attention is computed over the padded batch). Embeddings, LayerNorm,
    softmax and biases are ignored (a few percent).
    """
    return 2.0 * layers * (4 * hidden * hidden + 2 * hidden * ffn + 2 * seq_len * hidden)


def head_flops_per_row(hidden: int, vocab: int) -> float:
    """Forward FLOPs per projected row: the transform (H x H) and the vocabulary projection (H x V)."""
    return 2.0 * (hidden * hidden + hidden * vocab)


@dataclass
class FlopModel:
    """FLOPs of one micro-step: trained model x3 (forward + backward), teacher x1 (forward only)."""

    student: tuple[int, int, int]  # hidden, ffn, layers
    vocab: int
    teacher: tuple[int, int, int] | None = None
    teacher_head_rows_per_student_row: float = 1.0

    def micro_step(self, batch_tokens: int, seq_len: int, projected_rows: int) -> float:
        h, f, n = self.student
        total = 3.0 * (batch_tokens * encoder_flops_per_token(h, f, n, seq_len)
                       + projected_rows * head_flops_per_row(h, self.vocab))
        if self.teacher is not None:
            th, tf, tn = self.teacher
            total += batch_tokens * encoder_flops_per_token(th, tf, tn, seq_len)
            total += projected_rows * self.teacher_head_rows_per_student_row * head_flops_per_row(th, self.vocab)
        return total


# Dense peak TFLOP/s per device for the MFU denominator (bf16/fp16 tensor cores); run.peak_tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0,
               "A6000": 155.0, "L40": 181.0, "T4": 65.0}


def peak_tflops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.run.peak_tflops:
        return cfg.run.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
