"""Tokens/s of the full distillation training step: ours (DeepSpeed engine, kernels on used rows) against
the original recipe's eager step (distiller.py: full-vocabulary logits at every position for both models,
separate KL / CE / cosine with masked_select, AdamW + clipping), same models and batches, in one run.

    python benchmarks/bench_train_step.py            # batch 16, seq 128, 4x256 teacher, 2-layer student
    python benchmarks/bench_train_step.py --steps 5 --threads 2
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --preset base   # on a GPU

Presets: tiny (the defaults above) and base (BERT-base teacher 12 x 768, 12 heads, FFN 3072; a 6-layer
student initialised from teacher layers [0, 2, 4, 7, 9, 11] by the trainer's rule; batch 32, seq 128).
Explicit size flags override the preset.

CPU: steps of each variant are interleaved (eager, ours, ours-restricted, eager, ...) so that load from
other processes on a shared machine hits them alike; the median step time is reported. Prints a table with
wall time and process CPU time (less sensitive to other load).

CUDA: the variants run one after another (each built, warmed up, timed, then freed; --schedule sequential
does this on CPU too), so that the peak GPU memory of each (torch.cuda.max_memory_allocated above what was allocated before it was built: its models,
optimizer state and activations) is its own. Timed steps are bracketed by torch.cuda.synchronize(). MFU is
each variant's FLOPs (pretrain.metrics.flops.FlopModel: the rows it projects) over an assumed peak
(--peak-tflops, default 989: H100/H200 dense bf16).

--dtype bf16: the eager reference runs its forward and losses under torch.autocast(bf16) with fp32 weights
(the recipe used fp16 AMP); ours is the trainer's bf16 path: configs/distilbert_bf16.yaml
(ds_configs/bf16_zero2.json) and the teacher loaded by pretrain.models.load_teacher in bf16.
Tokens are real (non-pad) tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

REPO = Path(__file__).resolve().parents[1]
PRESETS: dict[str, dict[str, int | None]] = {
    # student_layers None: the trainer's rule (half the teacher's layers, evenly spaced).
    "tiny": {"batch": 16, "seq": 128, "hidden": 256, "heads": 4, "teacher_layers": 4, "student_layers": 2},
    "base": {"batch": 32, "seq": 128, "hidden": 768, "heads": 12, "teacher_layers": 12, "student_layers": None},
}
EAGER = "eager recipe step (reference)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Batch = dict[str, torch.Tensor]


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[Batch]:
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
    """The reference's Distiller.step: full logits everywhere, masked_select, KLDivLoss + CE + cosine.

    With `autocast` set (bf16), forward and losses run under torch.autocast as the recipe's AMP did; the
    weights, gradients and AdamW stay fp32.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, T: float = 2.0, a_ce: float = 5.0,
                 a_mlm: float = 2.0, a_cos: float = 1.0, autocast: torch.dtype | None = None):
        self.student, self.teacher = student, teacher
        self.T, self.a_ce, self.a_mlm, self.a_cos = T, a_ce, a_mlm, a_cos
        self.autocast = autocast
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

    def _loss(self, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
        return self.a_ce * loss_ce + self.a_mlm * loss_mlm + self.a_cos * loss_cos

    def __call__(self, b: Batch) -> float:
        ids, attn, labels = b["input_ids"], b["attention_mask"], b["labels"]
        amp = (torch.autocast(device_type=ids.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with amp:
            loss = self._loss(ids, attn, labels)
        self.opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), 5.0)
        self.opt.step()
        return loss.item()


def ours_config(batch: int, zero_stage: int, restrict: bool, dtype: str):
    """The training config the trainer would run: tiny_cpu.yaml (fp32) or distilbert_bf16.yaml (bf16)."""
    from distil.pretrain.config import load_config

    base = "configs/distilbert_bf16.yaml" if dtype == "bf16" else "configs/tiny_cpu.yaml"
    return load_config(str(REPO / base), [
        "teacher.path=bench", "data.shards=bench", f"data.batch_size={batch}",
        "engine.gradient_accumulation_steps=1", "engine.global_batch_size=null", f"engine.zero_stage={zero_stage}",
        f"loss.restrict_ce_to_mask={str(restrict).lower()}"])


class OurStep:
    """The trainer's micro-step: teacher rows under inference mode, objective via kernels, DeepSpeed engine.

    The teacher is loaded from `teacher_dir` by the trainer's own load_teacher (cast to the config's
    teacher.dtype, on `device`); the engine is built from the config by build_ds_config / param_groups.
    """

    def __init__(self, student: nn.Module, teacher_dir: str, restrict: bool, zero_stage: int, batch: int,
                 dtype: str, device: torch.device):
        import deepspeed

        from distil.pretrain.ds_config import build_ds_config, param_groups
        from distil.pretrain.losses import DistillationObjective, uses_kl
        from distil.pretrain.models import load_teacher

        self.cfg = cfg = ours_config(batch, zero_stage, restrict, dtype)
        cfg.teacher.path = teacher_dir
        self.teacher = load_teacher(cfg.teacher, need_logits=uses_kl(cfg.loss), device=device)
        objective = DistillationObjective(student, self.teacher, cfg.loss)
        ds = build_ds_config(cfg, total_steps=1000, world_size=1)
        self.engine, *_ = deepspeed.initialize(model=objective, model_parameters=param_groups(objective, 0.0),
                                               config=ds)
        self.dtypes = (f"engine {next(self.engine.module.parameters()).dtype}, "
                       f"teacher {next(self.teacher.parameters()).dtype}")

    def __call__(self, b: Batch) -> float:
        from distil.pretrain.losses import teacher_outputs

        t_out = teacher_outputs(self.teacher, b["input_ids"], b["attention_mask"], b["labels"], self.cfg.loss)
        out = self.engine(b["input_ids"], b["attention_mask"], b["labels"], t_out)
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.parts["loss"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                    help="bf16: autocast for the eager reference, the trainer's bf16 engine for ours")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--teacher-layers", type=int, default=None)
    ap.add_argument("--student-layers", type=int, default=None, help="default: the preset's (base: half)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU only)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 4 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 3 CUDA)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--schedule", choices=("auto", "interleaved", "sequential"), default="auto",
                    help="auto: interleaved on CPU, sequential on CUDA (see above)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="assumed per-GPU peak for MFU (989: H100/H200 dense bf16)")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    on_cuda = args.device == "cuda"
    if args.steps is None:
        args.steps = 20 if on_cuda else 4
    if args.warmup is None:
        args.warmup = 3 if on_cuda else 1
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1")
    if args.schedule == "auto":
        args.schedule = "sequential" if on_cuda else "interleaved"
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    return args


def select_device(device: str) -> None:
    """Point DeepSpeed's accelerator at the device (before deepspeed is imported); exit on a missing GPU."""
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: --device cuda but torch {torch.__version__} sees no CUDA device; run on a GPU "
                     "machine or use --device cpu")
        os.environ["DS_ACCELERATOR"] = "cuda"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_teacher(args: argparse.Namespace) -> BertForMaskedLM:
    return BertForMaskedLM(BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      num_hidden_layers=args.teacher_layers, num_attention_heads=args.heads,
                                      intermediate_size=4 * args.hidden, max_position_embeddings=512))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(variants: dict[str, Callable[[], Callable[[Batch], float]]], batches: list[Batch],
                    warmup: int) -> dict[str, dict]:
    """CPU: every variant built first, then one step of each in turn per batch."""
    steps = {name: make() for name, make in variants.items()}
    res: dict[str, dict] = {k: {"wall": [], "cpu": [], "loss": float("nan"), "dtypes": getattr(s, "dtypes", None)}
                            for k, s in steps.items()}
    for i, b in enumerate(batches):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            res[name]["loss"] = step(b)
            if i >= warmup:
                res[name]["wall"].append(time.perf_counter() - t0)
                res[name]["cpu"].append(time.process_time() - c0)
    return res


def run_sequential(variants: dict[str, Callable[[], Callable[[Batch], float]]], batches: list[Batch],
                   warmup: int, device: torch.device) -> dict[str, dict]:
    """Each variant alone (built, warmed up, timed, freed), so its peak GPU memory is its own (CUDA)."""
    on_cuda = device.type == "cuda"
    res: dict[str, dict] = {}
    for name, make in variants.items():
        gc.collect()
        before = 0
        if on_cuda:
            torch.cuda.empty_cache()
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        step = make()
        r: dict = {"wall": [], "cpu": [], "loss": float("nan")}
        for i, b in enumerate(batches):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            r["loss"] = step(b)
            sync(device)
            if i >= warmup:
                r["wall"].append(time.perf_counter() - t0)
                r["cpu"].append(time.process_time() - c0)
        r["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before if on_cuda else float("nan")
        r["dtypes"] = getattr(step, "dtypes", None)
        res[name] = r
        del step
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    select_device(args.device)
    on_cuda = args.device == "cuda"
    if not on_cuda:
        torch.set_num_threads(args.threads)
    import deepspeed  # noqa: F401 - import cost outside the timings

    from distil.pretrain.config import StudentConfig
    from distil.pretrain.distributed import init_distributed
    from distil.pretrain.metrics.flops import FlopModel
    from distil.pretrain.models import build_student

    torch.manual_seed(0)
    teacher = build_teacher(args)
    teacher.eval().requires_grad_(False)
    student, layer_map = build_student(teacher, StudentConfig(num_layers=args.student_layers))
    student.train()
    batches = make_batches(args.steps + args.warmup, args.batch, args.seq, args.vocab)
    device = init_distributed().device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    autocast = DTYPES[args.dtype] if args.dtype != "fp32" else None
    tmp = tempfile.TemporaryDirectory(prefix="bench_teacher_")
    teacher_dir = str(Path(tmp.name) / "teacher")
    teacher.save_pretrained(teacher_dir)  # ours loads it back through the trainer's load_teacher

    def eager() -> Callable[[Batch], float]:
        return EagerRecipeStep(copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device),
                               autocast=autocast)

    def ours(restrict: bool) -> Callable[[], Callable[[Batch], float]]:
        return lambda: OurStep(copy.deepcopy(student), teacher_dir, restrict, args.zero_stage, args.batch,
                               args.dtype, device)

    variants = {EAGER: eager, "ours, KL over all non-pad tokens": ours(False),
                "ours, restrict_ce_to_mask": ours(True)}
    if args.schedule == "sequential":
        res = run_sequential(variants, batches, args.warmup, device)
    else:
        res = run_interleaved(variants, batches, args.warmup)
    tmp.cleanup()

    timed = [{k: v.cpu() for k, v in b.items()} for b in batches[args.warmup:]]
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in timed)
    base = statistics.median(res[EAGER]["wall"])
    where = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, deepspeed {deepspeed.__version__}"
             if on_cuda else f"{args.threads} threads")
    print(f"batch {args.batch} x seq <= {args.seq}, {tokens:.0f} real tokens/batch on average; teacher "
          f"{args.teacher_layers}x{args.hidden}, student {len(layer_map)} layers"
          + (f" (teacher layers {layer_map})" if on_cuda else "") + f", vocab {args.vocab}, "
          f"{where}, ZeRO stage {args.zero_stage}, {args.steps} timed steps (median)"
          + (f", {args.dtype}" if args.dtype != "fp32" or on_cuda else ""))
    # The FLOPs each variant must do (pretrain.metrics.flops.FlopModel): the vocabulary projection dominates.
    ffn = 4 * args.hidden
    fm = FlopModel((args.hidden, ffn, len(layer_map)), args.vocab, (args.hidden, ffn, args.teacher_layers))
    width = statistics.mean(b["input_ids"].shape[1] for b in timed)
    cells = statistics.mean(b["input_ids"].numel() for b in timed)
    masked = statistics.mean(int((b["labels"] != -100).sum()) for b in timed)
    rows = {EAGER: cells, "ours, KL over all non-pad tokens": tokens, "ours, restrict_ce_to_mask": masked}
    flops = {name: fm.micro_step(int(cells), int(width), int(r)) for name, r in rows.items()}
    if on_cuda:
        print_cuda_table(res, tokens, base, flops, args.peak_tflops)
    else:
        print_cpu_table(res, tokens, base)
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (1 min)")
    for label, name in (("eager (every position)", EAGER), ("ours, KL on non-pad rows", "ours, KL over all non-pad tokens"),
                        ("ours, restrict_ce_to_mask", "ours, restrict_ce_to_mask")):
        print(f"model FLOPs per step, {label}: {flops[name] / 1e9:.0f} G ({rows[name]:.0f} projected rows)")
    if args.dtype != "fp32" or on_cuda:
        print(f"dtypes: {EAGER}: fp32 weights" + (f", forward under torch.autocast({args.dtype})" if autocast else "")
              + "".join(f"; {name}: {r['dtypes']}" for name, r in res.items() if r["dtypes"]))


def print_cpu_table(res: dict[str, dict], tokens: float, base: float) -> None:
    cpu_base = statistics.median(res[EAGER]["cpu"])
    print("| variant | wall s/step | tokens/s | speed-up | CPU s/step | speed-up by CPU time | last loss |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        med, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"| {name} | {med:.3f} | {tokens / med:.0f} | {base / med:.2f}x | {c:.2f} | {cpu_base / c:.2f}x "
              f"| {r['loss']:.3f} |")


def print_cuda_table(res: dict[str, dict], tokens: float, base: float, flops: dict[str, float],
                     peak_tflops: float) -> None:
    print("| variant | wall s/step | tokens/s | speed-up | peak GPU memory GiB | TFLOP/s | MFU | last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        med = statistics.median(r["wall"])
        achieved = flops[name] / med / 1e12
        print(f"| {name} | {med:.4f} | {tokens / med:.0f} | {base / med:.2f}x | {r['peak_bytes'] / 2**30:.2f} "
              f"| {achieved:.0f} | {achieved / peak_tflops:.1%} | {r['loss']:.3f} |")
    print(f"MFU = each variant's own FLOPs (FlopModel, the rows it projects; lines below) / median step time / "
          f"an ASSUMED peak of {peak_tflops:g} TFLOP/s (--peak-tflops; 989 = H100/H200 dense bf16). Peak memory: "
          "torch.cuda.max_memory_allocated while the variant was built and run, above what was allocated "
          "before (its models, optimizer state, activations); variants ran one after another.")


if __name__ == "__main__":
    main()
