"""Precision of the distillation loss's gradients under mixed precision, per row, against fp32.

The recipe trains in fp16 with a dynamic loss scale: the loss is multiplied by the scale (2^16 at first)
before backward and the gradients divided by it after. The setup is the one the loss sees right after the
student was initialised from its teacher: student hidden states = teacher hidden states + 5 % noise, the
vocabulary projection shared, KL(T=2) * T^2 on every row (alpha 5), masked-LM CE on 15 % of the rows
(alpha 2), cosine on the hidden states (alpha 1). What is compared is d loss / d student hidden, row by row:
||g - g_fp32|| / ||g_fp32||, for the rows without a label (KL and cosine only) and those with one.

  methods: ours      distil.kernels (fused linear KL + CE, fused cosine)
           autograd  plain mixed precision: low-precision logits, fp32 loss math, autograd gradients

    python benchmarks/bench_loss_scale.py                  # N = 1024, V = 30522, H = 128
    python benchmarks/bench_loss_scale.py --rows 256 --vocab 2000
"""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime

import torch

from distil.kernels import cosine_embedding_loss, fused_linear_distillation_kl_ce
from distil.kernels.reference import recipe_cosine, recipe_kl_ce

T, ALPHA_KL, ALPHA_CE, ALPHA_COS = 2.0, 5.0, 2.0, 1.0
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_inputs(rows: int, vocab: int, hidden: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    t_h = torch.randn(rows, hidden, generator=g)
    s_h = t_h + 0.05 * t_h.std() * torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden**-0.5
    b = torch.randn(vocab, generator=g) * 0.01
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) >= 0.15] = -100
    return s_h, t_h, w, b, labels, torch.ones(rows, dtype=torch.bool)


def ours_loss(s_h, t_h, w, b, labels, kl_mask):
    out = fused_linear_distillation_kl_ce(s_h, w, b, None, labels, kl_mask, T, ALPHA_KL, ALPHA_CE,
                                          teacher_hidden=t_h, teacher_weight=w, teacher_bias=b)
    return out.loss + ALPHA_COS * cosine_embedding_loss(s_h, t_h)


def autograd_loss(s_h, t_h, w, b, labels, kl_mask):
    logits = torch.addmm(b, s_h, w.t()).float()
    with torch.no_grad():
        t_logits = torch.addmm(b, t_h, w.t()).float()
    loss = recipe_kl_ce(logits, t_logits, labels, kl_mask, T, ALPHA_KL, ALPHA_CE)[0]
    return loss + ALPHA_COS * recipe_cosine(s_h.float(), t_h.float())


def hidden_grad(loss_fn, inputs, dtype: torch.dtype, scale: float) -> torch.Tensor:
    s_h, t_h, w, b, labels, kl_mask = inputs
    x = s_h.detach().to(dtype).clone().requires_grad_(True)
    loss = loss_fn(x, t_h.to(dtype), w.to(dtype), b.to(dtype), labels, kl_mask)
    (loss * scale).backward()
    return x.grad.double() / scale


def row_errors(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (g - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-300)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--loss-scale", type=float, default=2.0**16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    inputs = make_inputs(args.rows, args.vocab, args.hidden, args.seed)
    labelled = inputs[4] != -100
    ref = hidden_grad(autograd_loss, inputs, torch.float32, 1.0)  # fp32 everywhere, no scale needed
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; N={args.rows} V={args.vocab} H={args.hidden}, loss scale "
          f"{args.loss_scale:g}, {int(labelled.sum())} labelled rows")
    print("| dtype | method | unlabelled rows: median | max | labelled rows: median | max |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("fp16", "bf16"):
        for method, fn in (("ours", ours_loss), ("autograd", autograd_loss)):
            err = row_errors(hidden_grad(fn, inputs, DTYPES[name], args.loss_scale), ref)
            print(f"| {name} | {method} | {err[~labelled].median():.3g} | {err[~labelled].max():.3g} | "
                  f"{err[labelled].median():.3g} | {err[labelled].max():.3g} |")


if __name__ == "__main__":
    main()
