"""The training loop around the DeepSpeed engine: distillation (teacher -> student) or MLM pretraining.

Owns `Trainer` (set-up, then the loop) and `run_training`. Read top to bottom: set up (process group, data,
models, checks, engine, resume, tracker), then one loop of micro-steps; at each accumulation boundary one
small all-reduce decides together whether the loss was finite and whether a stop was requested, then the
engine steps, metrics are logged and checkpoints written. The pieces live beside it: distributed.py
(process group), ds_config.py (DeepSpeed config), metrics/ (FLOP model, the window and sink, what a metrics
line holds), checkpoint/ (CheckpointManager, the folder on disk, the counters and tracker run id it
checkpoints), run/ (the run's life on a cluster: exit statuses, the stop and non-finite exceptions, the
output folder's lock, finished runs, resumes on another world size, stop signals).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distil.common.config import flatten, to_container, to_yaml
from distil.common.errors import UserError
from distil.pretrain.checkpoint.files import read_trainer_state, resolve_resume, saved_world_size
from distil.pretrain.checkpoint.manager import CheckpointManager, EngineCheckpoint, RNGState
from distil.pretrain.checkpoint.state import Counters, TrackerRun
from distil.pretrain.config import TrainConfig, check_batch_arithmetic
from distil.pretrain.distributed import (
    barrier,
    init_distributed,
    is_collective_timeout,
    launcher_rank_and_world,
    seed_everything,
)
from distil.pretrain.ds_config import build_ds_config, param_groups
from distil.pretrain.losses import DistillationObjective, MaskedLMObjective, teacher_outputs, uses_kl
from distil.pretrain.metrics.flops import FlopModel, peak_tflops
from distil.pretrain.metrics.line import batch_counts, grad_norm, line_metrics
from distil.pretrain.metrics.window import MetricsSink, Window
from distil.pretrain.run import stopsignal
from distil.pretrain.run.lifecycle import (
    EXIT_FINISHED,
    EXIT_MORE_TO_DO,
    AlreadyFinished,
    CollectiveTimeout,
    MoreToDo,
    NonFiniteLossError,
    OutputDirLock,
    StopRequested,
    check_not_finished,
    keep_global_batch,
    mark_finished,
    nonfinite_message,
    restart_tags,
    timeout_message,
)
from distil.pretrain.run.lock import RunLock

if TYPE_CHECKING:
    from distil.data_pipeline.manifest import Manifest
    from distil.data_pipeline.stream.loader import PretrainStream
    from distil.pretrain.distributed import Dist
    from distil.pretrain.tracking.tracker import NullTracker

log = logging.getLogger("distil.train")

# A fault to test against: DISTIL_FAULT_NONFINITE_STEPS=9-11 makes the loss of steps 9 to 11 NaN on every rank
# (the real batches through the real engine, the gradients NaN as after a loss spike).
FAULT_ENV = "DISTIL_FAULT_NONFINITE_STEPS"


def fault_steps(spec: str) -> frozenset[int]:
    """`A-B` or `A`, comma separated: the steps whose loss is made NaN."""
    steps: set[int] = set()
    for part in filter(None, (x.strip() for x in spec.split(","))):
        first, _, last = part.partition("-")
        try:
            steps.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise UserError(f"{FAULT_ENV}={spec!r}: expected steps such as 9-11,20") from None
    return frozenset(steps)


class Trainer:
    """One training run: `setup()` fills in the state below, `train()` runs the loop to the end or a stop."""

    # given
    cfg: TrainConfig
    resume: str | None
    started: float  # time.monotonic() at construction: run.time_limit_minutes counts from here
    # where, and with how many processes
    run_dir: Path
    ckpt_dir: Path
    dist: Dist
    lock: OutputDirLock | None
    elastic_from: int | None  # the world size of the checkpoint, when resuming on another one
    global_batch: int
    # data
    stream: PretrainStream
    manifest: Manifest
    updates_per_epoch: int
    total_steps: int
    # models and engine
    teacher: torch.nn.Module | None  # distillation only
    layer_map: list[int]  # student layer i <- teacher layer layer_map[i] (distillation only)
    layer_plan: Any  # the layer losses and their projections (distillation only; layer_losses.LayerPlan)
    model: torch.nn.Module  # the model trained: the student, or the BERT of mlm mode
    tokenizer_from: str | None  # where the export takes its tokenizer from
    flop_model: FlopModel
    peak: float | None  # the device's peak TFLOP/s, for MFU
    ds_config: dict[str, Any]
    engine: Any  # deepspeed.DeepSpeedEngine
    engine_skips_nonfinite: bool
    own_grad_norm: bool  # measured here on logged steps (stage 0: DeepSpeed keeps none)
    last_grad_norm: float | None
    # checkpointed progress
    counters: Counters
    run: TrackerRun
    checkpoints: CheckpointManager
    resumed_from: Path | None
    tracker: NullTracker  # the interface; MlflowTracker on global rank 0 when tracking is on
    finished: bool
    fault_steps: frozenset[int]  # steps whose loss is made NaN (FAULT_ENV; tests of the rollback)

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.fault_steps = fault_steps(os.environ.get(FAULT_ENV, ""))
        self.resume = resume
        self.started = time.monotonic()  # run.time_limit_minutes counts from here
        self.lock: OutputDirLock | None = None
        self.finished = False

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from distil.data_pipeline.stream.loader import PretrainStream

        cfg = self.cfg
        # A signal during set-up is kept and honoured at the first update boundary (a scheduler may signal
        # a job at any time; dying without a checkpoint would lose the steps since the last one).
        self._install_signal_handlers()
        # Checks that need no process group come first, so bad input fails before DeepSpeed even loads.
        rank, world_size = launcher_rank_and_world()
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        RunLock(self.run_dir).probe()  # a live run's folder: refused on every rank before its files are read
        resume_path = resolve_resume(self.resume, self.ckpt_dir)
        self.elastic_from = keep_global_batch(cfg, resume_path, world_size)
        self.global_batch = check_batch_arithmetic(cfg, world_size)
        # With a fixed batch size the data layout is global (one batch sequence dealt to the ranks update by
        # update): what an update trains on does not depend on the world size, and a run resumes on another.
        self.stream = PretrainStream(
            cfg.data.shards, split="train", rank=rank, world_size=world_size, seed=cfg.run.seed,
            batch_size=cfg.data.batch_size, max_tokens=cfg.data.max_tokens, group_by_size=cfg.data.group_by_size,
            num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, masking=cfg.data.masking,
            pad_multiple=cfg.data.pad_multiple, micro_batches_per_update=cfg.engine.gradient_accumulation_steps,
            layout="global" if cfg.data.batch_size is not None else "per_rank",
        )
        self.updates_per_epoch = max(1, self.stream.batches_per_epoch() // cfg.engine.gradient_accumulation_steps)
        self.total_steps = cfg.run.max_steps or cfg.run.epochs * self.updates_per_epoch
        # every rank reads the same files: all stop, nothing written
        check_not_finished(self.run_dir, resume_path, self.total_steps)
        self.dist = d = init_distributed(cfg.engine.collective_timeout_s)
        if (d.rank, d.world_size) != (rank, world_size):
            raise RuntimeError(f"process group rank/world {d.rank}/{d.world_size} != launcher's {rank}/{world_size}")
        self.lock = OutputDirLock(self.run_dir)
        self.lock.acquire(self.dist)
        self.manifest = self.stream.manifest
        objective = self._build_models()
        self._build_engine(objective)
        self._restore(resume_path)
        self._start_tracker()
        self.peak = peak_tflops(cfg, d.device)
        barrier(self.dist.world_size)

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build_models(self) -> torch.nn.Module:
        """The trained model (and teacher), checked against the data; returns the objective to train."""
        from distil.data_pipeline.manifest import base_of, manifest_location
        from distil.pretrain import models
        from distil.pretrain.export import check_tokenizer_source, shards_tokenizer_sha256, tokenizer_source
        from distil.pretrain.families import dims

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
            self.layer_plan = objective.plan
            self.flop_model = FlopModel(dims(student.config), manifest.vocab_size, dims(self.teacher.config))
            if not need_logits:
                self.flop_model.teacher_head_rows_per_student_row = 0.0
        else:
            self.model = models.build_mlm_model(cfg.model, manifest)
            models.check_compatible(manifest, None, self.model, need_cosine=False)
            objective = MaskedLMObjective(self.model, cfg.loss)
            self.flop_model = FlopModel(dims(self.model.config), manifest.vocab_size)
        self.tokenizer_from = tokenizer_source(manifest, shards_base, cfg.teacher.path if cfg.mode == "distill" else None)
        if cfg.run.export:
            check_tokenizer_source(self.tokenizer_from, shards_tokenizer_sha256(manifest, shards_base, self.tokenizer_from))
        return objective

    def _build_engine(self, objective: torch.nn.Module) -> None:
        import deepspeed

        cfg = self.cfg
        self.ds_config = build_ds_config(cfg, self.total_steps, self.dist.world_size)
        if self.elastic_from is not None and cfg.engine.zero_stage > 0:
            # ZeRO-1/2 optimizer state of another data-parallel size: DeepSpeed's universal checkpoint
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
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
            self.counters.restarts += 1
            if self.elastic_from is not None:  # updates now take another number of micro-steps
                self.counters.micro_steps = self.counters.step * self.cfg.engine.gradient_accumulation_steps
        else:
            seed_everything(self.cfg.run.seed + self.dist.rank)  # dropout differs across ranks
            self.stream.set_epoch(0)
        self.resumed_from = resume_path

    def _start_tracker(self) -> None:
        from distil.pretrain.tracking.config import default_run_name
        from distil.pretrain.tracking.mlflow_tracker import create_tracker

        d = self.dist
        if d.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = create_tracker(self.cfg.tracking, rank=d.rank, local_rank=d.local_rank,
                                      world_size=d.world_size, run_dir=str(self.run_dir),
                                      resume_run_id=self.run.resumed_id, source="distil train",
                                      run_name=default_run_name(self.run_dir, self.cfg.mode))
        self.run.tracker = self.tracker
        if d.rank == 0:
            self._log_run_files(self.global_batch)
        if self.resumed_from is not None:
            self.tracker.set_tags(restart_tags(self.counters.restarts, self.counters.step))

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
        self.tracker.log_inputs(self.cfg.data.shards, self.manifest, split="train",
                                model=self.cfg.teacher.path if self.cfg.mode == "distill" else None)

    # ----------------------------------------------------------------------------------------------- loop
    def _install_signal_handlers(self) -> None:
        stopsignal.install()  # already done by the CLI at its start; here for in-process use

    @property
    def stop_signal(self) -> int | None:
        return stopsignal.received()

    def train(self) -> Path | None:
        """Runs to the end; returns the export folder (rank 0) or None."""
        cfg, c = self.cfg, self.counters
        sink = MetricsSink(self.run_dir, self.tracker, self.total_steps, c.step, self.dist.rank == 0)
        status = "FAILED"
        try:
            try:
                self._loop(sink)
            except RuntimeError as e:
                if not is_collective_timeout(e):
                    raise
                raise CollectiveTimeout(timeout_message(self.dist, e, self.counters.step)) from e
            final = self.save_checkpoint()
            export_dir = self.export() if cfg.run.export else None
            if self.dist.rank == 0:
                mark_finished(self.run_dir, final, c.step, export_dir)
            self.finished = True
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

    def _out_of_time(self) -> bool:
        limit = self.cfg.run.time_limit_minutes
        return limit is not None and time.monotonic() - self.started >= limit * 60

    def _loop(self, sink: MetricsSink) -> None:
        cfg, c, engine = self.cfg, self.counters, self.engine
        accum = cfg.engine.gradient_accumulation_steps
        out_of_time = False
        window = Window()
        window_nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)
        steps_here = 0
        while c.step < self.total_steps:
            for batch in self.stream:
                loss_out = self._micro_step(batch)
                window_nonfinite |= ~torch.isfinite(loss_out.loss.detach())
                window.add(loss_out.parts, *batch_counts(batch, self.flop_model, cfg.loss, cfg.mode))
                c.micro_steps += 1
                boundary = c.micro_steps % accum == 0
                if boundary:
                    nonfinite, stop, out_of_time = self._agree(window_nonfinite, self.stop_signal is not None,
                                                               self._out_of_time())
                    if nonfinite and not self.engine_skips_nonfinite and cfg.run.on_nonfinite == "stop":
                        # applied, the update would spoil the weights (a rollback reloads them after it)
                        raise NonFiniteLossError(nonfinite_message(1, c.step, self.checkpoints.latest()))
                    if self.own_grad_norm and self._logs_at(c.step + 1):
                        self.last_grad_norm = grad_norm(self.engine.module)
                engine.step()
                if not boundary:
                    continue
                c.step += 1
                steps_here += 1
                window_nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)
                rolled_back = self._after_update(nonfinite)
                sink.advance()
                if self._logs_at(c.step):
                    self._log(window, sink)
                    window = Window()
                periodic = cfg.checkpoint.every and c.step % cfg.checkpoint.every == 0
                if periodic and c.step < self.total_steps and c.nonfinite_in_row == 0 and not rolled_back:
                    # never mid-NaN-streak; a rollback has just written its own
                    self.save_checkpoint()
                if stop:
                    raise StopRequested()
                if c.step >= self.total_steps:
                    return
                if out_of_time or steps_here == cfg.run.stop_after_steps:
                    if out_of_time and self.dist.rank == 0:
                        log.info("run.time_limit_minutes=%g reached at step %d: checkpointing, more to do",
                                 cfg.run.time_limit_minutes, c.step)
                    raise MoreToDo()
            c.epoch += 1
            self.stream.set_epoch(c.epoch)

    def _micro_step(self, batch: dict[str, torch.Tensor]):
        d = self.dist.device
        ids = batch["input_ids"].to(d, non_blocking=True)
        mask = batch["attention_mask"].to(d, non_blocking=True)
        labels = batch["labels"].to(d, non_blocking=True)
        t_out = None
        if self.teacher is not None:
            t_out = teacher_outputs(self.teacher, ids, mask, labels, self.cfg.loss, self.layer_plan)
        out = self.engine(ids, mask, labels, t_out)
        if self.counters.step + 1 in self.fault_steps:
            nan = float("nan")
            out = replace(out, loss=out.loss * nan, parts={k: v * nan for k, v in out.parts.items()})
        self.engine.backward(out.loss)
        return out

    def _agree(self, nonfinite: torch.Tensor, stop: bool, out_of_time: bool) -> tuple[bool, bool, bool]:
        """One all-reduce (max) per update: every rank skips and stops together, so no collective hangs.
        It is also the loop's only host-device synchronisation outside log steps."""
        flags = torch.stack([nonfinite.float(), torch.tensor(float(stop), device=self.dist.device),
                             torch.tensor(float(out_of_time), device=self.dist.device)])
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nf, st, tl = flags.tolist()
        return nf > 0, st > 0, tl > 0

    def _after_update(self, nonfinite: bool) -> bool:
        """Counts the update; True when a non-finite streak was just rolled back."""
        c = self.counters
        if not self.engine.was_step_applied():
            c.skipped_steps += 1
        if not nonfinite:
            c.nonfinite_in_row = 0
            return False
        c.nonfinite_in_row += 1
        # A skipped update leaves the weights as they were; an applied one (ZeRO 0 in fp32/bf16) spoilt them.
        limit = self.cfg.run.max_nonfinite_steps if self.engine_skips_nonfinite else 1
        if c.nonfinite_in_row < limit:
            return False
        self._roll_back()
        return True

    def _roll_back(self) -> None:
        """run.on_nonfinite=rollback: the engine's state (weights, optimizer, loss scale) of the newest intact
        checkpoint, the data and the step count going on from here, so the batches since that checkpoint are
        skipped; recorded in the counters and written at once as a checkpoint, so a resume does the same.
        Every rank takes the same decision (the streak is agreed) and loads together."""
        c, run, engine = self.counters, self.cfg.run, self.engine
        message = nonfinite_message(c.nonfinite_in_row, c.step, self.checkpoints.latest())
        if run.on_nonfinite != "rollback":
            raise NonFiniteLossError(message)
        if c.rollbacks >= run.max_rollbacks:
            raise NonFiniteLossError(f"{message} ({c.rollbacks} rollback(s) already: run.max_rollbacks="
                                     f"{run.max_rollbacks})")
        target = resolve_resume("auto", self.ckpt_dir)
        if target is None:
            raise NonFiniteLossError(f"{message} (no checkpoint to roll back to)")
        if saved_world_size(target) != self.dist.world_size:
            raise NonFiniteLossError(f"{message} ({target} was written by another number of processes: no "
                                     "rollback across a resize)")
        restored = int(read_trainer_state(target)["counters"]["step"])
        kept = engine.global_steps, engine.global_samples, engine.skipped_steps
        self.checkpoints.restore_engine(target)
        engine.global_steps, engine.global_samples, engine.skipped_steps = kept
        c.rollbacks += 1
        c.nonfinite_in_row = 0
        c.skipped_windows.append([restored + 1, c.step])
        note = (f"the loss was NaN/inf at step {c.step}: rolled back to {target.name} (weights, optimizer, loss "
                f"scale); the batches of steps {restored + 1}-{c.step} are skipped (rollback {c.rollbacks} of at "
                f"most {run.max_rollbacks})")
        if self.dist.rank == 0:
            log.warning(note)
            self.tracker.set_tags({f"distil.rollback.{c.rollbacks}": note})
        self.save_checkpoint()

    def _log(self, w: Window, sink: MetricsSink) -> None:
        """Averages the window over ranks (one all-reduce) and writes one metrics line on rank 0."""
        totals = w.reduce(self.dist.device, self.dist.world_size)
        c = self.counters
        c.samples += int(totals.sequences)
        c.tokens += int(totals.tokens)
        if self.dist.rank == 0:
            sink.write(c.step, line_metrics(totals, self.engine, c, self.last_grad_norm, self.peak,
                                            self.dist.world_size, self.stream))

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
    status: str  # FINISHED | KILLED (stopped by a signal) | STOPPED (time limit, stop_after_steps) | DONE
    export_dir: Path | None
    signal: int | None  # the signal that stopped the run, if any
    exit_status: int = EXIT_FINISHED


def run_training(cfg: TrainConfig, resume: str | None = None) -> RunResult:
    trainer = Trainer(cfg, resume)
    try:
        try:
            trainer.setup()
        except AlreadyFinished as e:
            log.info("%s", e)
            return RunResult("DONE", None, None, EXIT_FINISHED)
        export_dir = trainer.train()
    finally:
        trainer.release_lock()
    if trainer.finished:
        return RunResult("FINISHED", export_dir, None, EXIT_FINISHED)
    if trainer.stop_signal is not None:
        return RunResult("KILLED", None, trainer.stop_signal, 128 + trainer.stop_signal)
    return RunResult("STOPPED", None, None, EXIT_MORE_TO_DO)
