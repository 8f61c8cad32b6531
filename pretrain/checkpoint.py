"""Atomic, resumable checkpoints: the DeepSpeed checkpoint plus everything else a bitwise resume needs.

Layout (a shared filesystem when multi-node, as DeepSpeed requires):

    <dir>/step_00001000/            DeepSpeed: model, optimizer partitions, scheduler, loss scaler
    <dir>/step_00001000/trainer_state.json   counters, tracker run id, world size   (rank 0)
    <dir>/step_00001000/rank_00003.json      data stream position + RNG states        (one per rank)
    <dir>/step_00001000/COMPLETE              written last, after a barrier
    <dir>/latest                              names the newest complete checkpoint (atomic rename)

A checkpoint counts only when it is complete and named by `latest`; a crash mid-write leaves a folder that
is never read and is removed by the next rotation. Loading never unpickles arbitrary objects: every torch
file is read with `weights_only=True`, DeepSpeed's loss-scaler and fragment-address classes (plain records) being the only
allow-listed globals.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distil.common.errors import UserError
from distil.common.files import atomic_write_text

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
PREFIX = "step_"


@dataclass
class Counters:
    step: int = 0  # optimizer steps taken (applied or skipped by the loss scaler)
    epoch: int = 0
    micro_steps: int = 0
    samples: int = 0  # sequences seen, all ranks
    tokens: int = 0  # non-pad tokens seen, all ranks
    skipped_steps: int = 0  # steps whose update was skipped (non-finite)
    nonfinite_in_row: int = 0
    elapsed_s: float = 0.0  # training wall time before this (re)start


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed: list[Any] = [LossScaler, DynamicLossScaler, fragment_address]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    return allowed


def install_weights_only_loading(engine: Any) -> None:
    """Make the engine's checkpoint reads `torch.load(weights_only=True)` (DeepSpeed's default is False)."""

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # pickle.UnpicklingError and friends
                raise UserError(f"checkpoint file {path} holds objects a weights-only load refuses "
                                f"({str(e).splitlines()[-1][:200]}); it was not written by distil") from None

    engine.checkpoint_engine.load = load


def complete_tags(ckpt_dir: Path) -> list[str]:
    tags = [p.name for p in ckpt_dir.glob(f"{PREFIX}*") if (p / COMPLETE).is_file()]
    return sorted(tags)


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """--resume auto: the checkpoint `latest` names in ckpt_dir (None if there is none yet); PATH: that one."""
    if resume is None:
        return None
    if resume == "auto":
        latest = ckpt_dir / LATEST
        if not latest.is_file():
            return None
        path = ckpt_dir / latest.read_text().strip()
    else:
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path} is not a complete distil checkpoint (no {COMPLETE} marker): pass another "
                        "checkpoint folder or --resume auto")
    return path


def save(engine: Any, ckpt_dir: Path, counters: Counters, *, stream_state: dict[str, Any], run_id: str | None,
         world_size: int, keep: int) -> Path:
    """Every rank calls this; returns the checkpoint folder once it is complete and named by `latest`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(counters.step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():  # a stale, incomplete folder from a crashed attempt at this step
        shutil.rmtree(path)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    rank_state = {"stream": stream_state, "rng": rng_state()}
    atomic_write_text(path / f"rank_{rank:05d}.json", json.dumps(rank_state))
    if rank == 0:
        trainer_state = {"counters": asdict(counters), "run_id": run_id, "world_size": world_size}
        atomic_write_text(path / TRAINER_STATE, json.dumps(trainer_state, indent=2))
    _barrier()
    if rank == 0:
        atomic_write_text(path / COMPLETE, tag + "\n")
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        rotate(ckpt_dir, keep)
    _barrier()
    return path


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and abandoned partial folders."""
    complete = complete_tags(ckpt_dir)
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    keep_set = set(complete[-keep:]) | ({latest} if latest else set())
    newest_kept = max(keep_set) if keep_set else None
    for p in ckpt_dir.glob(f"{PREFIX}*"):
        if p.name in keep_set:
            continue
        if p.name in complete or (newest_kept is not None and p.name < newest_kept):
            shutil.rmtree(p, ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def load(engine: Any, path: Path, *, world_size: int) -> tuple[Counters, dict[str, Any], str | None]:
    """Restores engine state and this rank's RNG; returns counters, this rank's stream state, tracker run id."""
    state = read_trainer_state(path)
    if state["world_size"] != world_size:
        raise UserError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                        f"{world_size}: resume with the same number of GPUs/processes")
    install_weights_only_loading(engine)
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_state = json.loads((path / f"rank_{rank:05d}.json").read_text())
    set_rng_state(rank_state["rng"])
    return Counters(**state["counters"]), rank_state["stream"], state.get("run_id")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
