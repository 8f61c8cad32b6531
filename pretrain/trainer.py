"""The training loop around the DeepSpeed engine: distillation (teacher -> student) or MLM pretraining.

Read top to bottom: set up (process group, data, models, checks, engine, resume, tracker), then one loop of
micro-steps; at each accumulation boundary one small all-reduce decides together whether the loss was
finite and whether a stop was requested, then the engine steps, metrics are logged and checkpoints written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distil.common import assets
from distil.common.errors import UserError
from distil.pretrain import checkpoint as ckpt
from distil.pretrain.config import (
    TrainConfig,
    check_batch_arithmetic,
    flatten,
    to_container,
    to_yaml,
    warmup_steps,
)
from distil.pretrain.losses import (
    DistillationObjective,
    MaskedLMObjective,
    projection_rows,
    teacher_outputs,
    uses_kl,
)

log = logging.getLogger("distil.train")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for run.max_nonfinite_steps optimizer steps in a row."""


# --------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def launcher_rank_and_world() -> tuple[int, int]:
    """RANK / WORLD_SIZE as every supported launcher (deepspeed, torchrun) sets them; 0 / 1 when run alone."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers (set by the launcher)") from None


def init_distributed() -> Dist:
    """One process group for every launcher (deepspeed, torchrun, SLURM srun, single process)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- DeepSpeed config
def resolve_ds_config_path(path: str) -> Path:
    return assets.ds_config_path(path)


def _fill(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Fill an "auto" (or absent) field; a concrete value that disagrees with the training config is an error."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
        return
    same = (list(current) == list(value)) if isinstance(value, list | tuple) else current == value
    if isinstance(value, float) and isinstance(current, int | float):
        same = math.isclose(float(current), value, rel_tol=1e-9, abs_tol=0.0)
    if not same:
        raise UserError(f"DeepSpeed config sets {where}.{key}={current!r} but the training config gives {value!r}: "
                        f"set it to \"auto\" in the JSON (the training config is the single source)")


def build_ds_config(cfg: TrainConfig, total_steps: int, world_size: int) -> dict[str, Any]:
    """The ds_config JSON with every "auto" filled from the training config (and checked where concrete)."""
    path = resolve_ds_config_path(cfg.engine.ds_config)
    try:
        ds: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"engine.ds_config {path} is not valid JSON: {e}") from None
    accum = cfg.engine.gradient_accumulation_steps
    micro = cfg.data.batch_size if cfg.data.batch_size is not None else 1  # token-budget batches vary
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "ds_config")
    _fill(ds, "gradient_accumulation_steps", accum, "ds_config")
    _fill(ds, "train_batch_size", micro * accum * world_size, "ds_config")
    _fill(ds, "gradient_clipping", cfg.optim.max_grad_norm, "ds_config")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise UserError(f"{path}: optimizer.type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    _fill(params, "lr", cfg.optim.lr, "optimizer.params")
    _fill(params, "betas", list(cfg.optim.betas), "optimizer.params")
    _fill(params, "eps", cfg.optim.eps, "optimizer.params")
    _fill(params, "weight_decay", cfg.optim.weight_decay, "optimizer.params")
    sched = ds.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})
    if sched.get("type") != "WarmupDecayLR":
        raise UserError(f"{path}: scheduler.type must be WarmupDecayLR (linear warm-up then linear decay)")
    sp = sched.setdefault("params", {})
    sp.setdefault("warmup_type", "linear")
    sp.setdefault("warmup_min_lr", 0.0)
    _fill(sp, "warmup_max_lr", cfg.optim.lr, "scheduler.params")
    # DeepSpeed requires at least one warm-up step (its lr is 0 at step 0 either way).
    _fill(sp, "warmup_num_steps", max(1, warmup_steps(cfg, total_steps)), "scheduler.params")
    _fill(sp, "total_num_steps", total_steps, "scheduler.params")
    precision = cfg.engine.precision
    ds.setdefault("fp16", {})
    ds.setdefault("bf16", {})
    _fill(ds["fp16"], "enabled", precision == "fp16", "fp16")
    _fill(ds["bf16"], "enabled", precision == "bf16", "bf16")
    zero = ds.setdefault("zero_optimization", {})
    _fill(zero, "stage", cfg.engine.zero_stage, "zero_optimization")
    ds.setdefault("steps_per_print", 10**9)
    return ds


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm weights (as the recipe)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        if name.endswith("bias") or "layernorm" in lname or "layer_norm" in lname:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------- FLOPs
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


# --------------------------------------------------------------------------------------------------- logging
@dataclass
class Window:
    """Sums over the micro-steps since the last log line (this rank). Loss parts stay tensors on the
    device, so logging costs no synchronisation until the log step."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_steps: int = 0
    sequences: int = 0
    tokens: int = 0
    masked: int = 0
    flops: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, parts: dict[str, torch.Tensor], sequences: int, tokens: int, masked: int, flops: float) -> None:
        for k, v in parts.items():
            v = v.detach().double()
            self.parts[k] = self.parts[k] + v if k in self.parts else v
        self.micro_steps += 1
        self.sequences += sequences
        self.tokens += tokens
        self.masked += masked
        self.flops += flops


class MetricsSink:
    """Rank 0: a tqdm bar, metrics.jsonl in the run folder, and the tracker."""

    def __init__(self, run_dir: Path, tracker: Any, total_steps: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.tracker = tracker
        self.bar = None
        self.file = None
        if enabled:
            from tqdm.auto import tqdm

            # On a terminal a live bar; in a log file (batch jobs) one line per logged step instead.
            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
            self.file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        assert self.file is not None and self.bar is not None
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if self.bar.disable:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("loss") or k in
                             ("lr", "grad_norm", "tokens_per_s", "mfu"))
            print(f"step {step}: {shown}", file=sys.stderr, flush=True)
        self.tracker.log_metrics(metrics, step=step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


# ------------------------------------------------------------------------------------------------ the trainer
class StopRequested(Exception):
    """SIGTERM/SIGINT: checkpoint written, run ends KILLED."""


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.stop_signal: int | None = None

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from distil.data_pipeline.stream import PretrainStream
        from distil.pretrain import models
        from distil.pretrain.export import check_tokenizer_source, tokenizer_source
        from distil.pretrain.tracking import create_tracker

        cfg = self.cfg
        # Checks that need no process group come first, so bad input fails before DeepSpeed even loads.
        rank, world_size = launcher_rank_and_world()
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        global_batch = check_batch_arithmetic(cfg, world_size)
        resume_path = ckpt.resolve_resume(self.resume, self.ckpt_dir)
        self.stream = PretrainStream(
            cfg.data.shards, split="train", rank=rank, world_size=world_size, seed=cfg.run.seed,
            batch_size=cfg.data.batch_size, max_tokens=cfg.data.max_tokens, group_by_size=cfg.data.group_by_size,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, masking=cfg.data.masking,
            pad_multiple=cfg.data.pad_multiple,
        )
        self.dist = d = init_distributed()
        if (d.rank, d.world_size) != (rank, world_size):
            raise RuntimeError(f"process group rank/world {d.rank}/{d.world_size} != launcher's {rank}/{world_size}")
        manifest = self.manifest = self.stream.manifest
        from distil.data_pipeline.manifest import base_of, manifest_location

        shards_base = base_of(manifest_location(cfg.data.shards))

        seed_everything(cfg.run.seed)  # same initial weights on every rank
        self.teacher = None
        if cfg.mode == "distill":
            need_logits = uses_kl(cfg.loss)
            self.teacher = models.load_teacher(cfg.teacher, need_logits=need_logits, device=d.device)
            student, self.layer_map = models.build_student(self.teacher, cfg.student)
            models.check_compatible(manifest, self.teacher, student, need_cosine=cfg.loss.alpha_cos > 0,
                                    teacher_path=cfg.teacher.path)
            self.model = student
            objective: torch.nn.Module = DistillationObjective(student, self.teacher, cfg.loss)
            t = self.teacher.config
            self.flop_model = FlopModel((student.config.dim, student.config.hidden_dim, student.config.n_layers),
                                        manifest.vocab_size, (t.hidden_size, t.intermediate_size, t.num_hidden_layers))
            if not need_logits:
                self.flop_model.teacher_head_rows_per_student_row = 0.0
        else:
            self.model = models.build_bert_mlm(cfg.bert, manifest)
            models.check_compatible(manifest, None, self.model, need_cosine=False)
            objective = MaskedLMObjective(self.model, cfg.loss)
            c = self.model.config
            self.flop_model = FlopModel((c.hidden_size, c.intermediate_size, c.num_hidden_layers), manifest.vocab_size)
        self.tokenizer_from = tokenizer_source(manifest, shards_base, cfg.teacher.path if cfg.mode == "distill" else None)
        if cfg.run.export:
            check_tokenizer_source(self.tokenizer_from)

        self.updates_per_epoch = max(1, self.stream.batches_per_epoch() // cfg.engine.gradient_accumulation_steps)
        self.total_steps = cfg.run.max_steps or cfg.run.epochs * self.updates_per_epoch
        self.ds_config = build_ds_config(cfg, self.total_steps, d.world_size)
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(
            model=objective, model_parameters=param_groups(objective, cfg.optim.weight_decay), config=self.ds_config,
        )
        # Skipping a non-finite update is DeepSpeed's: ZeRO 1/2 (any precision) and the fp16 loss scaler skip
        # updates whose gradients are not finite. Stage 0 in fp32/bf16 would apply them, so there the first
        # non-finite loss stops the run before the update.
        self.engine_skips_nonfinite = cfg.engine.zero_stage > 0 or cfg.engine.precision == "fp16"
        # Without ZeRO, DeepSpeed clips fp32/bf16 gradients without keeping the norm
        # (get_global_grad_norm() is None): measure it ourselves on the steps that are logged.
        self.own_grad_norm = cfg.engine.zero_stage == 0
        self.last_grad_norm: float | None = None
        self.student_dtype = next(self.engine.module.parameters()).dtype

        self.counters = ckpt.Counters()
        run_id = None
        if resume_path is not None:
            self.counters, stream_state, run_id = ckpt.load(self.engine, resume_path, world_size=d.world_size)
            self.stream.set_epoch(self.counters.epoch)
            self.stream.load_state_dict(stream_state)
        else:
            seed_everything(cfg.run.seed + d.rank)  # dropout differs across ranks
            self.stream.set_epoch(0)
        self.resumed_from = resume_path

        if d.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = create_tracker(cfg.tracking, rank=d.rank, local_rank=d.local_rank, world_size=d.world_size,
                                      run_dir=str(self.run_dir), resume_run_id=run_id)
        if d.rank == 0:
            self._log_run_files(global_batch)
        self.peak = peak_tflops(cfg, d.device)
        self._barrier()

    def _log_run_files(self, global_batch: int) -> None:
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (self.run_dir / "manifest.json").write_text(self.manifest.to_json())
        params = flatten(to_container(self.cfg))
        params.update({"derived.world_size": self.dist.world_size, "derived.total_steps": self.total_steps,
                       "derived.global_batch_size": global_batch,
                       "derived.updates_per_epoch": self.updates_per_epoch})
        if self.cfg.mode == "distill":
            params["derived.student_layer_map"] = str(self.layer_map)
        self.tracker.log_params(params)
        for name in ("config.yaml", "ds_config.json", "manifest.json"):
            self.tracker.log_artifact(str(self.run_dir / name), artifact_path="run")

    # ----------------------------------------------------------------------------------------------- loop
    def _install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def train(self) -> Path | None:
        """Runs to the end; returns the export folder (rank 0) or None."""
        cfg, c = self.cfg, self.counters
        self._install_signal_handlers()
        sink = MetricsSink(self.run_dir, self.tracker, self.total_steps, c.step, self.dist.rank == 0)
        status = "FAILED"
        try:
            self._loop(sink)
            self.save_checkpoint()
            export_dir = self.export() if cfg.run.export else None
            status = "FINISHED"
            return export_dir
        except StopRequested:
            status = "KILLED"
            self.save_checkpoint()
            return None
        finally:
            sink.close()
            self.tracker.finish(status)

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.total_steps

    def _grad_norm(self) -> float:
        """2-norm of the (already all-reduced) gradients before the optimizer step, without ZeRO."""
        grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return float("nan")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _loop(self, sink: MetricsSink) -> None:
        cfg, c, engine = self.cfg, self.counters, self.engine
        accum = cfg.engine.gradient_accumulation_steps
        window = Window()
        window_nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)
        steps_here = 0
        while c.step < self.total_steps:
            for batch in self.stream:
                loss_out = self._micro_step(batch)
                window_nonfinite |= ~torch.isfinite(loss_out.loss.detach())
                window.add(loss_out.parts, *self._batch_counts(batch))
                c.micro_steps += 1
                boundary = c.micro_steps % accum == 0
                if boundary:
                    nonfinite, stop = self._agree(window_nonfinite, self.stop_signal is not None)
                    if nonfinite and not self.engine_skips_nonfinite:
                        raise NonFiniteLossError(self._nonfinite_message(1))
                    if self.own_grad_norm and self._logs_at(c.step + 1):
                        self.last_grad_norm = self._grad_norm()
                engine.step()
                if not boundary:
                    continue
                c.step += 1
                steps_here += 1
                window_nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)
                self._after_update(nonfinite)
                sink.advance()
                if self._logs_at(c.step):
                    self._log(window, sink)
                    window = Window()
                periodic = cfg.checkpoint.every and c.step % cfg.checkpoint.every == 0
                if periodic and c.step < self.total_steps and c.nonfinite_in_row == 0:  # never mid-NaN-streak
                    self.save_checkpoint()
                if stop or steps_here == cfg.run.stop_after_steps:
                    raise StopRequested()
                if c.step >= self.total_steps:
                    return
            c.epoch += 1
            self.stream.set_epoch(c.epoch)

    def _micro_step(self, batch: dict[str, torch.Tensor]):
        d = self.dist.device
        ids = batch["input_ids"].to(d, non_blocking=True)
        mask = batch["attention_mask"].to(d, non_blocking=True)
        labels = batch["labels"].to(d, non_blocking=True)
        t_out = None
        if self.teacher is not None:
            t_out = teacher_outputs(self.teacher, ids, mask, labels, self.cfg.loss)
        out = self.engine(ids, mask, labels, t_out)
        self.engine.backward(out.loss)
        return out

    def _batch_counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, float]:
        """Sequences, real tokens, masked tokens and FLOPs, from the CPU copy of the batch (no device sync)."""
        mask, labels = batch["attention_mask"], batch["labels"]
        tokens = int(mask.sum())
        masked = int((labels != -100).sum())
        rows = int(projection_rows(mask, labels, self.cfg.loss, self.cfg.mode).sum())
        flops = self.flop_model.micro_step(mask.numel(), mask.shape[1], rows)
        return mask.shape[0], tokens, masked, flops

    def _agree(self, nonfinite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
        """One all-reduce (max) per update: every rank skips and stops together, so no collective hangs.
        It is also the loop's only host-device synchronisation outside log steps."""
        flags = torch.stack([nonfinite.float(), torch.tensor(float(stop), device=self.dist.device)])
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nf, st = flags.tolist()
        return nf > 0, st > 0

    def _after_update(self, nonfinite: bool) -> None:
        c = self.counters
        if not self.engine.was_step_applied():
            c.skipped_steps += 1
        if nonfinite:
            c.nonfinite_in_row += 1
            if c.nonfinite_in_row >= self.cfg.run.max_nonfinite_steps:
                raise NonFiniteLossError(self._nonfinite_message(c.nonfinite_in_row))
        else:
            c.nonfinite_in_row = 0

    def _nonfinite_message(self, n: int) -> str:
        latest = self.ckpt_dir / ckpt.LATEST
        where = f"{self.ckpt_dir / latest.read_text().strip()}" if latest.is_file() else "none written yet"
        return (f"the loss was NaN/inf for {n} optimizer step(s) in a row at step {self.counters.step}; stopped "
                f"without writing a checkpoint (last good checkpoint: {where}). Lower optim.lr, use "
                "engine.precision=bf16, or check the data")

    def _log(self, w: Window, sink: MetricsSink) -> None:
        """Averages the window over ranks (one all-reduce) and writes one metrics line on rank 0."""
        keys = sorted(w.parts)
        counts = torch.tensor([w.micro_steps, w.sequences, w.tokens, w.masked, w.flops], dtype=torch.float64,
                              device=self.dist.device)
        vec = torch.cat([torch.stack([w.parts[k] for k in keys]).to(self.dist.device), counts])
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vals = vec.tolist()
        micro, seqs, tokens, masked, flops = vals[len(keys):]
        c = self.counters
        c.samples += int(seqs)
        c.tokens += int(tokens)
        if self.dist.rank != 0:
            return
        dt = max(time.perf_counter() - w.started, 1e-9)
        metrics: dict[str, float] = {k: vals[i] / max(micro, 1) for i, k in enumerate(keys)}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.last_grad_norm
        metrics.update({
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_scale": float(getattr(self.engine.optimizer, "cur_scale", getattr(self.engine.optimizer,
                                                                                    "loss_scale", 1.0))),
            "tokens_per_s": tokens / dt,
            "sequences_per_s": seqs / dt,
            "masked_tokens": masked,
            "tflops_per_s": flops / dt / 1e12,
            "skipped_steps": float(c.skipped_steps),
            "epoch": float(c.epoch),
        })
        if self.peak:
            metrics["mfu"] = flops / dt / (self.peak * 1e12 * self.dist.world_size)
        stats = self.stream.stats() if hasattr(self.stream, "stats") else {}
        if "skipped_samples" in stats:
            metrics["skipped_samples"] = float(stats["skipped_samples"])
        sink.write(c.step, metrics)

    # ------------------------------------------------------------------------------------ checkpoint/export
    def save_checkpoint(self) -> Path:
        c = self.counters
        if (self.ckpt_dir / ckpt.tag_for(c.step) / ckpt.COMPLETE).is_file():
            return self.ckpt_dir / ckpt.tag_for(c.step)
        if self.dist.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        return ckpt.save(self.engine, self.ckpt_dir, c, stream_state=self.stream.state_dict(),
                         run_id=self.tracker.run_id, world_size=self.dist.world_size, keep=self.cfg.checkpoint.keep)

    def export(self) -> Path | None:
        from distil.pretrain.export import export_model

        out = None
        if self.dist.rank == 0:
            assert self.tokenizer_from is not None
            out = export_model(self.model, self.run_dir / "export", self.tokenizer_from)
            self.tracker.log_student(str(out))
        self._barrier()
        return out

    def _barrier(self) -> None:
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.barrier()


@dataclass
class RunResult:
    status: str  # FINISHED | KILLED (stopped by a signal or run.stop_after_steps; checkpoint written)
    export_dir: Path | None
    signal: int | None  # the signal that stopped the run, if any


def run_training(cfg: TrainConfig, resume: str | None = None) -> RunResult:
    trainer = Trainer(cfg, resume)
    trainer.setup()
    export_dir = trainer.train()
    status = "FINISHED" if trainer.counters.step >= trainer.total_steps else "KILLED"
    return RunResult(status, export_dir, trainer.stop_signal)
