"""The training loop around the DeepSpeed engine: distillation (teacher -> student) or MLM pretraining.

Owns `Trainer` (set-up, then the loop), the counters it checkpoints, the stop / non-finite exceptions and
`run_training`. Read top to bottom: set up (process group, data, models, checks, engine, resume, tracker),
then one loop of micro-steps; at each accumulation boundary one small all-reduce decides together whether
the loss was finite and whether a stop was requested, then the engine steps, metrics are logged and
checkpoints written. The pieces live beside it: distributed.py (process group), ds_config.py (DeepSpeed
config), flops.py (FLOP model), metrics.py (window and sink), checkpoint.py (CheckpointManager), runlock.py
(one run per output folder).

Cluster life (docs/cluster.md): global rank 0 locks run.output_dir before anything is written; a resume of
a run that already finished stops before anything is touched; SIGTERM/SIGINT (even during set-up),
run.stop_after_steps and run.time_limit_minutes stop at an update boundary with a checkpoint; a collective
that times out names the rank that went silent; a checkpoint of W processes resumes on W' (the global
batch kept through the accumulation, the data position global, ZeRO state re-partitioned by DeepSpeed).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distil.common.errors import UserError
from distil.common.files import atomic_write_json
from distil.pretrain import stopsignal
from distil.pretrain.checkpoint import (
    SHARED,
    CheckpointManager,
    EngineCheckpoint,
    RNGState,
    rank_file,
    read_trainer_state,
    resolve_resume,
    saved_world_size,
)
from distil.pretrain.config import TrainConfig, check_batch_arithmetic, flatten, to_container, to_yaml
from distil.pretrain.distributed import (
    any_rank,
    barrier,
    init_distributed,
    is_collective_timeout,
    launcher_rank_and_world,
    seed_everything,
    silent_ranks,
)
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
from distil.pretrain.runlock import RunLock, RunLocked

log = logging.getLogger("distil.train")

FINISHED_MARKER = "finished.json"  # in run.output_dir: the checkpoint a finished run ended with

# Exit statuses of `distil train` (docs/cluster.md has the table).
EXIT_FINISHED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MORE_TO_DO = 3  # stopped with a checkpoint at run.time_limit_minutes or run.stop_after_steps
EXIT_LOCKED = 75  # EX_TEMPFAIL: run.output_dir is in use by a live run; nothing was touched


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for run.max_nonfinite_steps optimizer steps in a row."""


class StopRequested(Exception):
    """SIGTERM/SIGINT: checkpoint written, run ends KILLED."""


class MoreToDo(StopRequested):
    """run.time_limit_minutes or run.stop_after_steps: checkpoint written, more steps to go."""


class AlreadyFinished(Exception):
    """--resume of a run that has already finished: nothing to do, nothing touched."""


class CollectiveTimeout(RuntimeError):
    """A collective waited past engine.collective_timeout_s: a rank hung (the message names it if known)."""


__all__ = ["AlreadyFinished", "CollectiveTimeout", "NonFiniteLossError", "RunLocked", "Trainer", "run_training"]


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
    restarts: int = 0  # times this run was resumed from a checkpoint

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
        self.started = time.monotonic()  # run.time_limit_minutes counts from here
        self.lock: RunLock | None = None
        self.finished = False

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from distil.data_pipeline.stream import PretrainStream

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
        self.elastic_from = self._keep_global_batch(resume_path, world_size)
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
        self._check_not_finished(resume_path)  # every rank reads the same files: all stop, nothing written
        self.dist = d = init_distributed(cfg.engine.collective_timeout_s)
        if (d.rank, d.world_size) != (rank, world_size):
            raise RuntimeError(f"process group rank/world {d.rank}/{d.world_size} != launcher's {rank}/{world_size}")
        self._lock_output_dir()
        self.manifest = self.stream.manifest
        objective = self._build_models()
        self._build_engine(objective)
        self._restore(resume_path)
        self._start_tracker()
        self.peak = peak_tflops(cfg, d.device)
        barrier(self.dist.world_size)

    def _keep_global_batch(self, resume_path: Path | None, world_size: int) -> int | None:
        """A checkpoint of another world size: sets the accumulation that keeps its global batch (or stops
        with the key to set). Returns the checkpoint's world size, or None when it is this run's."""
        if resume_path is None:
            return None
        saved = saved_world_size(resume_path)
        if saved == world_size:
            return None
        try:
            stream = json.loads(rank_file(resume_path, 0).read_text())["stream"]["config"]
            per_update, layout = int(stream["per_update"]), stream["layout"]
        except (OSError, ValueError, KeyError, TypeError):
            per_update, layout = 0, None
        if layout != "global":
            raise UserError(f"checkpoint {resume_path} was written by {saved} processes, this run has {world_size}, "
                            "and its data position is per process (data.max_tokens, or an older distil): resume "
                            f"with {saved} processes")
        micro_batches = saved * per_update  # per update, all ranks together
        e = self.cfg.engine
        if micro_batches % world_size:
            raise UserError(f"checkpoint {resume_path} takes {saved} processes x {per_update} micro-batches = "
                            f"{micro_batches} micro-batches per update, which {world_size} processes cannot share "
                            f"evenly: resume on a number of processes that divides {micro_batches}")
        accumulation = micro_batches // world_size
        if accumulation != e.gradient_accumulation_steps:
            if os.environ.get("RANK", "0") == "0":
                log.info("resuming a checkpoint of %d processes on %d: engine.gradient_accumulation_steps %d -> %d "
                         "keeps the global batch", saved, world_size, e.gradient_accumulation_steps, accumulation)
            e.gradient_accumulation_steps = accumulation
        return saved

    def _check_not_finished(self, resume_path: Path | None) -> None:
        """Raises AlreadyFinished when resume_path is the checkpoint a finished run ended with (and the
        config asks for no more steps than it has)."""
        marker = self.run_dir / FINISHED_MARKER
        if resume_path is None or not marker.is_file():
            return
        try:
            finished = json.loads(marker.read_text())
        except ValueError:
            return
        step = read_trainer_state(resume_path)["counters"]["step"]
        if finished.get("checkpoint") == resume_path.name and step >= self.total_steps:
            raise AlreadyFinished(f"{self.run_dir} finished at step {step} (checkpoint {resume_path}); nothing to do")

    def _lock_output_dir(self) -> None:
        """Global rank 0 locks run.output_dir before anything is written; every rank stops if it cannot."""
        message = None
        if self.dist.rank == 0:
            self.lock = RunLock(self.run_dir)
            try:
                self.lock.acquire()
            except RunLocked as e:
                self.lock, message = None, str(e)
        if any_rank(message is not None, self.dist):
            raise RunLocked(message or "run.output_dir is in use by a live run (see global rank 0's error)")

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
            self.counters.restarts += 1
            if self.elastic_from is not None:  # updates now take another number of micro-steps
                self.counters.micro_steps = self.counters.step * self.cfg.engine.gradient_accumulation_steps
        else:
            seed_everything(self.cfg.run.seed + self.dist.rank)  # dropout differs across ranks
            self.stream.set_epoch(0)
        self.resumed_from = resume_path

    def _start_tracker(self) -> None:
        from distil.pretrain.tracking import create_tracker, default_run_name

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
            self._tag_restart()

    def _tag_restart(self) -> None:
        tags = {"distil.restarts": str(self.counters.restarts), "distil.resumed_at_step": str(self.counters.step)}
        if os.environ.get("SLURM_RESTART_COUNT"):
            tags["distil.slurm_restart_count"] = os.environ["SLURM_RESTART_COUNT"]
        self.tracker.set_tags(tags)

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
                raise CollectiveTimeout(self._timeout_message(e)) from e
            final = self.save_checkpoint()
            export_dir = self.export() if cfg.run.export else None
            if self.dist.rank == 0:
                atomic_write_json(self.run_dir / FINISHED_MARKER, {
                    "checkpoint": final.name, "step": c.step,
                    "export": str(export_dir) if export_dir is not None else None,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
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

    def _timeout_message(self, error: RuntimeError) -> str:
        d = self.dist
        wait_s = min(d.timeout_s, 60.0)
        who = silent_ranks(d, wait_s)
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        return (f"rank {d.rank}: a collective waited more than engine.collective_timeout_s={d.timeout_s:g} s at "
                f"step {self.counters.step}: {who} ({first}). The last checkpoint is intact: resume with "
                "--resume auto once the node is healthy")

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.total_steps

    def _grad_norm(self) -> float:
        """2-norm of the (already all-reduced) gradients before the optimizer step, without ZeRO."""
        grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return float("nan")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

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
                window.add(loss_out.parts, *self._batch_counts(batch))
                c.micro_steps += 1
                boundary = c.micro_steps % accum == 0
                if boundary:
                    nonfinite, stop, out_of_time = self._agree(window_nonfinite, self.stop_signal is not None,
                                                               self._out_of_time())
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

    def _agree(self, nonfinite: torch.Tensor, stop: bool, out_of_time: bool) -> tuple[bool, bool, bool]:
        """One all-reduce (max) per update: every rank skips and stops together, so no collective hangs.
        It is also the loop's only host-device synchronisation outside log steps."""
        flags = torch.stack([nonfinite.float(), torch.tensor(float(stop), device=self.dist.device),
                             torch.tensor(float(out_of_time), device=self.dist.device)])
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nf, st, tl = flags.tolist()
        return nf > 0, st > 0, tl > 0

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
        for key in ("skipped_samples", "skipped_shards"):  # damaged input, skipped and counted (read.py)
            if key in stats:
                metrics[key] = float(stats[key])
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
