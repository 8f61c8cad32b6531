"""Tokens/s of the full distillation training step: ours (DeepSpeed engine, kernels on used rows) against
the original recipe's eager step (distiller.py: full-vocabulary logits at every position for both models,
separate KL / CE / cosine with masked_select, AdamW + clipping), same models and batches, in one run.

    python benchmarks/bench_train_step.py            # batch 16, seq 128, 4x256 teacher, 2-layer student
    python benchmarks/bench_train_step.py --steps 5 --threads 2

Steps of each variant are interleaved (eager, ours, ours-restricted, eager, ...) so that load from other
processes on a shared machine hits them alike; the median step time is reported. Tokens are real
(non-pad) tokens. Prints a table with wall time and process CPU time (less sensitive to other load).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches shaped like group_by_size output: lengths in [seq/2, seq], padded to the longest (multiple of 8),
    15 % of real tokens selected for prediction, 80/10/10."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        width = int(-(-int(lengths.max()) // 8) * 8)
        ids = torch.randint(5, vocab, (batch, width), generator=g)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids[:, 0] = 2
        ids[torch.arange(batch), lengths - 1] = 3
        ids[mask == 0] = 0
        real = mask.bool() & (ids > 4)
        k = int(-(-int(mask.sum()) * 15 // 100))
        scores = torch.rand(ids.shape, generator=g).masked_fill(~real, -1.0)
        chosen = torch.zeros_like(real)
        chosen.view(-1)[scores.view(-1).topk(k).indices] = True
        labels = torch.full_like(ids, -100)
        labels[chosen] = ids[chosen]
        roll = torch.rand(ids.shape, generator=g)
        ids = ids.clone()
        ids[chosen & (roll < 0.8)] = 4
        rnd = chosen & (roll >= 0.8) & (roll < 0.9)
        ids[rnd] = torch.randint(5, vocab, (int(rnd.sum()),), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class EagerRecipeStep:
    """The reference's Distiller.step: full logits everywhere, masked_select, KLDivLoss + CE + cosine."""

    def __init__(self, student: nn.Module, teacher: nn.Module, T: float = 2.0, a_ce: float = 5.0,
                 a_mlm: float = 2.0, a_cos: float = 1.0):
        self.student, self.teacher = student, teacher
        self.T, self.a_ce, self.a_mlm, self.a_cos = T, a_ce, a_mlm, a_cos
        no_decay = ["bias", "LayerNorm.weight"]
        groups = [
            {"params": [p for n, p in student.named_parameters() if not any(nd in n for nd in no_decay)],
             "weight_decay": 0.0},
            {"params": [p for n, p in student.named_parameters() if any(nd in n for nd in no_decay)],
             "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=5e-4, eps=1e-6, betas=(0.9, 0.98))
        self.kl = nn.KLDivLoss(reduction="batchmean")
        self.ce = nn.CrossEntropyLoss(ignore_index=-100)
        self.cos = nn.CosineEmbeddingLoss(reduction="mean")

    def __call__(self, b: dict[str, torch.Tensor]) -> float:
        ids, attn, labels = b["input_ids"], b["attention_mask"], b["labels"]
        s_out = self.student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        with torch.no_grad():
            t_out = self.teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        s_logits, t_logits = s_out.logits, t_out.logits
        mask = attn.unsqueeze(-1).expand_as(s_logits).bool()
        s_sel = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
        t_sel = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
        loss_ce = self.kl(nn.functional.log_softmax(s_sel / self.T, dim=-1),
                          nn.functional.softmax(t_sel / self.T, dim=-1)) * self.T**2
        loss_mlm = self.ce(s_logits.view(-1, s_logits.size(-1)), labels.view(-1))
        s_h, t_h = s_out.hidden_states[-1], t_out.hidden_states[-1]
        hmask = attn.unsqueeze(-1).expand_as(s_h).bool()
        dim = s_h.size(-1)
        s_hs = torch.masked_select(s_h, hmask).view(-1, dim)
        t_hs = torch.masked_select(t_h, hmask).view(-1, dim)
        loss_cos = self.cos(s_hs, t_hs, s_hs.new_ones(s_hs.size(0)))
        loss = self.a_ce * loss_ce + self.a_mlm * loss_mlm + self.a_cos * loss_cos
        self.opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), 5.0)
        self.opt.step()
        return loss.item()


class OurStep:
    """The trainer's micro-step: teacher rows under inference mode, objective via kernels, DeepSpeed engine."""

    def __init__(self, student: nn.Module, teacher: nn.Module, restrict: bool, zero_stage: int, batch: int):
        import deepspeed

        from pretrain.config import load_config
        from pretrain.losses import DistillationObjective
        from pretrain.trainer import build_ds_config, param_groups

        self.cfg = load_config("configs/tiny_cpu.yaml", [
            "teacher.path=bench", "data.shards=bench", f"data.batch_size={batch}",
            "engine.gradient_accumulation_steps=1", f"engine.zero_stage={zero_stage}",
            f"loss.restrict_ce_to_mask={str(restrict).lower()}"])
        self.teacher = teacher
        objective = DistillationObjective(student, teacher, self.cfg.loss)
        ds = build_ds_config(self.cfg, total_steps=1000, world_size=1)
        self.engine, *_ = deepspeed.initialize(model=objective, model_parameters=param_groups(objective, 0.0),
                                               config=ds)

    def __call__(self, b: dict[str, torch.Tensor]) -> float:
        from pretrain.losses import teacher_outputs

        t_out = teacher_outputs(self.teacher, b["input_ids"], b["attention_mask"], b["labels"], self.cfg.loss)
        out = self.engine(b["input_ids"], b["attention_mask"], b["labels"], t_out)
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.parts["loss"])


def init_single_process() -> None:
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (after 1 warm-up)")
    ap.add_argument("--zero-stage", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import deepspeed  # noqa: F401 - import cost outside the timings

    from pretrain.config import StudentConfig
    from pretrain.models import build_student

    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                         num_hidden_layers=args.teacher_layers, num_attention_heads=4,
                                         intermediate_size=4 * args.hidden, max_position_embeddings=512))
    teacher.eval().requires_grad_(False)
    student, _ = build_student(teacher, StudentConfig(num_layers=args.student_layers))
    student.train()
    batches = make_batches(args.steps + 1, args.batch, args.seq, args.vocab)
    init_single_process()
    variants = {
        "eager recipe step (reference)": EagerRecipeStep(copy.deepcopy(student), teacher),
        "ours, KL over all non-pad tokens": OurStep(copy.deepcopy(student), teacher, False, args.zero_stage, args.batch),
        "ours, restrict_ce_to_mask": OurStep(copy.deepcopy(student), teacher, True, args.zero_stage, args.batch),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, float] = {}
    for i, b in enumerate(batches):
        for name, step in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = step(b)
            if i > 0:  # the first step is warm-up
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches[1:])
    base = statistics.median(times["eager recipe step (reference)"])
    print(f"batch {args.batch} x seq <= {args.seq}, {tokens:.0f} real tokens/batch on average; teacher "
          f"{args.teacher_layers}x{args.hidden}, student {args.student_layers} layers, vocab {args.vocab}, "
          f"{args.threads} threads, ZeRO stage {args.zero_stage}, {args.steps} timed steps (median)")
    cpu_base = statistics.median(cpu["eager recipe step (reference)"])
    print("| variant | wall s/step | tokens/s | speed-up | CPU s/step | speed-up by CPU time | last loss |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med, c = statistics.median(ts), statistics.median(cpu[name])
        print(f"| {name} | {med:.3f} | {tokens / med:.0f} | {base / med:.2f}x | {c:.2f} | {cpu_base / c:.2f}x "
              f"| {losses[name]:.3f} |")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min)")
    # The FLOPs each variant must do (pretrain.trainer.FlopModel): the vocabulary projection dominates.
    from pretrain.trainer import FlopModel

    fm = FlopModel((args.hidden, 4 * args.hidden, args.student_layers), args.vocab,
                   (args.hidden, 4 * args.hidden, args.teacher_layers))
    timed = batches[1:]
    width = statistics.mean(b["input_ids"].shape[1] for b in timed)
    cells = statistics.mean(b["input_ids"].numel() for b in timed)
    masked = statistics.mean(int((b["labels"] != -100).sum()) for b in timed)
    for name, rows in (("eager (every position)", cells), ("ours, KL on non-pad rows", tokens),
                       ("ours, restrict_ce_to_mask", masked)):
        print(f"model FLOPs per step, {name}: {fm.micro_step(int(cells), int(width), int(rows)) / 1e9:.0f} G "
              f"({rows:.0f} projected rows)")


if __name__ == "__main__":
    main()
