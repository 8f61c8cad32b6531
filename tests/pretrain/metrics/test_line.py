"""pretrain/metrics/line.py directly: a micro-batch's counts and FLOPs (the rows projected follow the loss: every
non-pad token for the recipe's KL, masked tokens only in MLM mode or with restrict_ce_to_mask), and the gradient
norm measured where DeepSpeed keeps none."""

from __future__ import annotations

import math

import torch

from distil.pretrain.config import LossConfig
from distil.pretrain.metrics.flops import FlopModel
from distil.pretrain.metrics.line import batch_counts, grad_norm

BATCH = {
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    "labels": torch.tensor([[-100, 7, -100, -100], [5, -100, -100, -100]]),
}
FLOPS = FlopModel((8, 16, 2), vocab=30)


def test_counts_and_the_rows_each_objective_projects():
    seqs, tokens, masked, flops = batch_counts(BATCH, FLOPS, LossConfig(), "distill")
    assert (seqs, tokens, masked) == (2, 6, 2)
    assert flops == FLOPS.micro_step(8, 4, 6)  # the recipe's KL: every non-pad token
    assert batch_counts(BATCH, FLOPS, LossConfig(restrict_ce_to_mask=True), "distill")[3] == FLOPS.micro_step(8, 4, 2)
    assert batch_counts(BATCH, FLOPS, LossConfig(), "mlm")[3] == FLOPS.micro_step(8, 4, 2)


def test_grad_norm_is_the_norm_over_every_gradient():
    layer = torch.nn.Linear(3, 2)
    assert math.isnan(grad_norm(layer))  # no gradients yet
    layer.weight.grad = torch.full((2, 3), 2.0)
    layer.bias.grad = torch.tensor([3.0, 4.0])
    assert grad_norm(layer) == math.sqrt(6 * 4.0 + 9.0 + 16.0)
