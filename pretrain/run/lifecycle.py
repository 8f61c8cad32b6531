"""A training run's life around its loop: exit statuses, the exceptions that end or stop a run, the finished
marker, the lock on run.output_dir, a resume on another world size, restart tags and the messages of a run
that fails (docs/cluster.md).

Global rank 0 locks run.output_dir before anything is written; a resume of a run that already finished
stops before anything is touched; SIGTERM/SIGINT (even during set-up), run.stop_after_steps and
run.time_limit_minutes stop at an update boundary with a checkpoint (the trainer raises StopRequested or
MoreToDo there); a collective that times out names the rank that went silent; a checkpoint of W processes
resumes on W' (the global batch kept through the accumulation, the data position global, ZeRO state
re-partitioned by DeepSpeed).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from distil.common.errors import UserError
from distil.common.files import atomic_write_json
from distil.pretrain.checkpoint.files import rank_file, read_trainer_state, saved_world_size
from distil.pretrain.config import TrainConfig
from distil.pretrain.distributed import Dist, any_rank, silent_ranks
from distil.pretrain.run.lock import RunLock, RunLocked

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


# ---------------------------------------------------------------------------------------------- set-up
def keep_global_batch(cfg: TrainConfig, resume_path: Path | None, world_size: int) -> int | None:
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
    e = cfg.engine
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


def check_not_finished(run_dir: Path, resume_path: Path | None, total_steps: int) -> None:
    """Raises AlreadyFinished when resume_path is the checkpoint a finished run ended with (and the
    config asks for no more steps than it has)."""
    marker = run_dir / FINISHED_MARKER
    if resume_path is None or not marker.is_file():
        return
    try:
        finished = json.loads(marker.read_text())
    except ValueError:
        return
    step = read_trainer_state(resume_path)["counters"]["step"]
    if finished.get("checkpoint") == resume_path.name and step >= total_steps:
        raise AlreadyFinished(f"{run_dir} finished at step {step} (checkpoint {resume_path}); nothing to do")


class OutputDirLock:
    """Global rank 0's lock on run.output_dir (runlock.py) for the run's life; the other ranks hold none."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.held: RunLock | None = None

    def acquire(self, d: Dist) -> None:
        """Global rank 0 locks run.output_dir before anything is written; every rank stops if it cannot."""
        message = None
        if d.rank == 0:
            self.held = RunLock(self.run_dir)
            try:
                self.held.acquire()
            except RunLocked as e:
                self.held, message = None, str(e)
        if any_rank(message is not None, d):
            raise RunLocked(message or "run.output_dir is in use by a live run (see global rank 0's error)")

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None


def restart_tags(restarts: int, step: int) -> dict[str, str]:
    """The tracker tags of a resumed run."""
    tags = {"distil.restarts": str(restarts), "distil.resumed_at_step": str(step)}
    if os.environ.get("SLURM_RESTART_COUNT"):
        tags["distil.slurm_restart_count"] = os.environ["SLURM_RESTART_COUNT"]
    return tags


# ------------------------------------------------------------------------------------------------- ends
def mark_finished(run_dir: Path, checkpoint: Path, step: int, export_dir: Path | None) -> None:
    """Global rank 0, once the final checkpoint (and export) are written: what a later resume finds."""
    atomic_write_json(run_dir / FINISHED_MARKER, {
        "checkpoint": checkpoint.name, "step": step,
        "export": str(export_dir) if export_dir is not None else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def timeout_message(d: Dist, error: RuntimeError, step: int) -> str:
    """CollectiveTimeout's message: who went silent (asked of the ranks for at most a minute)."""
    wait_s = min(d.timeout_s, 60.0)
    who = silent_ranks(d, wait_s)
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return (f"rank {d.rank}: a collective waited more than engine.collective_timeout_s={d.timeout_s:g} s at "
            f"step {step}: {who} ({first}). The last checkpoint is intact: resume with "
            "--resume auto once the node is healthy")


def nonfinite_message(n: int, step: int, latest: Path | None) -> str:
    """NonFiniteLossError's message after `n` non-finite steps in a row at `step`."""
    where = f"{latest}" if latest is not None else "none written yet"
    return (f"the loss was NaN/inf for {n} optimizer step(s) in a row at step {step}; stopped "
            f"without writing a checkpoint (last good checkpoint: {where}). Lower optim.lr, use "
            "engine.precision=bf16, or check the data")
