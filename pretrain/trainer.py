"""The training loop around the DeepSpeed engine: distillation (teacher -> student) or MLM pretraining.

Owns `Trainer` (set-up, then the loop), the counters it checkpoints, the stop / non-finite exceptions and
`run_training`. Read top to bottom: set up (process group, data, models, checks, engine, resume, tracker),
then one loop of micro-steps; at each accumulation boundary one small all-reduce decides together whether
the loss was finite and whether a stop was requested, then the engine steps, metrics are logged and
checkpoints written. The pieces live beside it: distributed.py (process group), ds_config.py (DeepSpeed
config), flops.py (FLOP model), metrics.py (window and sink), checkpoint.py (CheckpointManager).
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distil.pretrain.checkpoint import SHARED, CheckpointManager, EngineCheckpoint, RNGState, resolve_resume
from distil.pretrain.config import TrainConfig, check_batch_arithmetic, flatten, to_container, to_yaml
from distil.pretrain.distributed import barrier, init_distributed, launcher_rank_and_world, seed_everything
from distil.pretrain.ds_config import build_ds_config, param_groups
from distil.pretrain.flops import FlopModel, peak_tflops
from distil.pretrain.losses import (
    DistillationObjective,
    MaskedLMObjective,
    projection_rows,
    teacher_outputs,
    uses_kl,
)
from distil.pretrain.metrics import MetricsSink, Window

log = logging.getLogger("distil.train")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for run.max_nonfinite_steps optimizer steps in a row."""


class StopRequested(Exception):
    """SIGTERM/SIGINT: checkpoint written, run ends KILLED."""


@dataclass
class Counters:
    """Training progress, the same on every rank (trainer_state.json "counters")."""

    checkpoint_scope: ClassVar[str] = SHARED

    step: int = 0  # optimizer steps taken (applied or skipped by the loss scaler)
    epoch: int = 0
    micro_steps: int = 0
    samples: int = 0  # sequences seen, all ranks
    tokens: int = 0  # non-pad tokens seen, all ranks
    skipped_steps: int = 0  # steps whose update was skipped (non-finite)
    nonfinite_in_row: int = 0
    elapsed_s: float = 0.0  # training wall time before this (re)start

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = Counters(**state)
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))


class TrackerRun:
    """The tracker's run id (trainer_state.json "run_id"), so a resumed run appends to the same run."""

    checkpoint_scope: ClassVar[str] = SHARED

    def __init__(self) -> None:
        self.resumed_id: str | None = None  # from the checkpoint, before the tracker exists
        self.tracker: Any = None

    def state_dict(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else self.resumed_id

    def load_state_dict(self, state: str | None) -> None:
        self.resumed_id = state


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.stop_signal: int | None = None

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from distil.data_pipeline.stream import PretrainStream

        cfg = self.cfg
        # Checks that need no process group come first, so bad input fails before DeepSpeed even loads.
        rank, world_size = launcher_rank_and_world()
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.global_batch = check_batch_arithmetic(cfg, world_size)
        resume_path = resolve_resume(self.resume, self.ckpt_dir)
        self.stream = PretrainStream(
            cfg.data.shards, split="train", rank=rank, world_size=world_size, seed=cfg.run.seed,
            batch_size=cfg.data.batch_size, max_tokens=cfg.data.max_tokens, group_by_size=cfg.data.group_by_size,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, masking=cfg.data.masking,
            pad_multiple=cfg.data.pad_multiple,
        )
        self.dist = d = init_distributed()
        if (d.rank, d.world_size) != (rank, world_size):
            raise RuntimeError(f"process group rank/world {d.rank}/{d.world_size} != launcher's {rank}/{world_size}")
        self.manifest = self.stream.manifest
        objective = self._build_models()
        self._build_engine(objective)
        self._restore(resume_path)
        self._start_tracker()
        self.peak = peak_tflops(cfg, d.device)
        barrier(self.dist.world_size)

    def _build_models(self) -> torch.nn.Module:
        """The trained model (and teacher), checked against the data; returns the objective to train."""
        from distil.data_pipeline.manifest import base_of, manifest_location
        from distil.pretrain import models
        from distil.pretrain.export import check_tokenizer_source, tokenizer_source

        cfg, manifest, device = self.cfg, self.manifest, self.dist.device
        shards_base = base_of(manifest_location(cfg.data.shards))
        seed_everything(cfg.run.seed)  # same initial weights on every rank
        self.teacher = None
        if cfg.mode == "distill":
            need_logits = uses_kl(cfg.loss)
            self.teacher = models.load_teacher(cfg.teacher, need_logits=need_logits, device=device)
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
        return objective

    def _build_engine(self, objective: torch.nn.Module) -> None:
        import deepspeed

        cfg = self.cfg
        self.updates_per_epoch = max(1, self.stream.batches_per_epoch() // cfg.engine.gradient_accumulation_steps)
        self.total_steps = cfg.run.max_steps or cfg.run.epochs * self.updates_per_epoch
        self.ds_config = build_ds_config(cfg, self.total_steps, self.dist.world_size)
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

    def _restore(self, resume_path: Path | None) -> None:
        """The checkpointed parts, loaded from resume_path if given (else a fresh start)."""
        self.counters = Counters()
        self.run = TrackerRun()
        parts = {"engine": EngineCheckpoint(self.engine), "counters": self.counters, "run_id": self.run,
                 "stream": self.stream, "rng": RNGState()}  # the RNG last: loading must not draw from it
        self.checkpoints = CheckpointManager(self.ckpt_dir, parts, world_size=self.dist.world_size,
                                             keep=self.cfg.checkpoint.keep)
        if resume_path is not None:
            self.checkpoints.load(resume_path)  # the data position includes its epoch
        else:
            seed_everything(self.cfg.run.seed + self.dist.rank)  # dropout differs across ranks
            self.stream.set_epoch(0)
        self.resumed_from = resume_path

    def _start_tracker(self) -> None:
        from distil.pretrain.tracking import create_tracker

        d = self.dist
        if d.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = create_tracker(self.cfg.tracking, rank=d.rank, local_rank=d.local_rank,
                                      world_size=d.world_size, run_dir=str(self.run_dir),
                                      resume_run_id=self.run.resumed_id)
        self.run.tracker = self.tracker
        if d.rank == 0:
            self._log_run_files(self.global_batch)

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
        latest = self.checkpoints.latest()
        where = f"{latest}" if latest is not None else "none written yet"
        return (f"the loss was NaN/inf for {n} optimizer step(s) in a row at step {self.counters.step}; stopped "
                f"without writing a checkpoint (last good checkpoint: {where}). Lower optim.lr, use "
                "engine.precision=bf16, or check the data")

    def _log(self, w: Window, sink: MetricsSink) -> None:
        """Averages the window over ranks (one all-reduce) and writes one metrics line on rank 0."""
        totals = w.reduce(self.dist.device, self.dist.world_size)
        c = self.counters
        c.samples += int(totals.sequences)
        c.tokens += int(totals.tokens)
        if self.dist.rank != 0:
            return
        dt, flops = totals.seconds, totals.flops
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.last_grad_norm
        optimizer = self.engine.optimizer
        metrics: dict[str, float] = {
            **totals.losses,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_scale": float(getattr(optimizer, "cur_scale", getattr(optimizer, "loss_scale", 1.0))),
            "tokens_per_s": totals.tokens / dt,
            "sequences_per_s": totals.sequences / dt,
            "masked_tokens": totals.masked,
            "tflops_per_s": flops / dt / 1e12,
            "skipped_steps": float(c.skipped_steps),
            "epoch": float(c.epoch),
        }
        if self.peak:
            metrics["mfu"] = flops / dt / (self.peak * 1e12 * self.dist.world_size)
        stats = self.stream.stats() if hasattr(self.stream, "stats") else {}
        if "skipped_samples" in stats:
            metrics["skipped_samples"] = float(stats["skipped_samples"])
        sink.write(c.step, metrics)

    # ------------------------------------------------------------------------------------ checkpoint/export
    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.counters.step)

    def export(self) -> Path | None:
        from distil.pretrain.export import export_model

        out = None
        if self.dist.rank == 0:
            assert self.tokenizer_from is not None
            out = export_model(self.model, self.run_dir / "export", self.tokenizer_from)
            self.tracker.log_student(str(out))
        barrier(self.dist.world_size)
        return out


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
