"""Atomic, resumable checkpoints: `CheckpointManager` saves and loads a mapping of stateful parts.

Writes this layout (a shared filesystem when multi-node, as DeepSpeed requires; the names, finding the
checkpoint to resume from, checksums, damage and rotation are checkpoint_files.py's):

    <dir>/step_00001000/            DeepSpeed: model, optimizer partitions, scheduler, loss scaler
    <dir>/step_00001000/trainer_state.json   counters, tracker run id, world size   (rank 0)
    <dir>/step_00001000/rank_00003.json      data stream position + RNG states        (one per rank)
    <dir>/step_00001000/checksums.json        size and CRC-32 of every file above    (rank 0)
    <dir>/step_00001000/COMPLETE              written last, after a barrier
    <dir>/latest                              names the newest complete checkpoint (atomic rename)

Each part is named and has state_dict()/load_state_dict(); its `checkpoint_scope` says where its state goes:
SHARED (the same on every rank: rank 0 writes it into trainer_state.json under its name), PER_RANK (the
default: every rank writes it into its own rank_<rank, 5 digits>.json) or OWN_FILES (the part writes its own files into
the checkpoint folder with save_files/load_files: the DeepSpeed engine). A new piece of state is one more
entry in the mapping.

A checkpoint counts only when it is complete and named by `latest`, and is checked for damage before a
resume (checkpoint_files.py). Loading never unpickles arbitrary objects: every torch file is read with
`weights_only=True`, DeepSpeed's loss-scaler and fragment-address classes (plain records) being the only
allow-listed globals.

Resuming on another number of processes ("elastic"): `load` then hands each PER_RANK part the states of
every saved rank (`load_resharded(states)`) and each OWN_FILES part the folder and the saved world size
(`load_files_resharded`); a part without that method stops the resume with one error naming it. The
DeepSpeed engine re-partitions ZeRO-1/2 optimizer state through DeepSpeed's universal checkpoint: rank 0
converts the checkpoint once (deepspeed.checkpoint.ds_to_universal, torch.load held to weights_only) into
`<dir>/.universal/<tag>` (beside the checkpoint, whose files checksums.json lists; only the newest
conversion is kept), and every rank loads it with the engine built with `checkpoint.load_universal`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.distributed as dist

from distil.common.errors import UserError
from distil.common.files import atomic_write_json, atomic_write_text
from distil.pretrain.checkpoint.files import (
    CHECKSUMMED_FORMAT,
    COMPLETE,
    DAMAGED_PREFIX,
    FORMAT_KEY,
    LATEST,
    TRAINER_STATE,
    WORLD_SIZE_KEY,
    damage,
    latest_path,
    rank_file,
    read_trainer_state,
    rotate,
    tag_for,
    write_checksums,
)

log = logging.getLogger("distil.train")
UNIVERSAL_DIR = ".universal"  # <dir>/.universal/<tag>: DeepSpeed's universal form, for an elastic resume


SHARED = "shared"
PER_RANK = "rank"
OWN_FILES = "files"


class Stateful(Protocol):
    """A part of the training state; state_dict() returns JSON-serialisable data."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def scope_of(part: Any) -> str:
    scope = getattr(part, "checkpoint_scope", PER_RANK)
    if scope not in (SHARED, PER_RANK, OWN_FILES):
        raise ValueError(f"checkpoint_scope {scope!r} is not one of {SHARED}, {PER_RANK}, {OWN_FILES}")
    return scope


# ------------------------------------------------------------------------------------------------- RNG state
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


class RNGState:
    """This process's Python, NumPy, torch (and CUDA) generators, per rank (dropout differs across ranks)."""

    checkpoint_scope: ClassVar[str] = PER_RANK

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Another world size: generators seeded from the saved rank 0's torch state and this rank, so each
        rank draws its own dropout masks (the same ones again on a rerun)."""
        from distil.common.hashing import mix_seed

        rank = dist.get_rank() if dist.is_initialized() else 0
        base = int.from_bytes(base64.b64decode(states[0]["torch"])[-8:], "little")
        seed = mix_seed([base % 2**63, rank, len(states)])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- DeepSpeed engine
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


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Every torch.load inside the block reads weights-only (DeepSpeed's universal-checkpoint code asks for
    weights_only=False), with the allow-list of install_weights_only_loading."""
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return original(f, *args, **kwargs)
            except Exception as e:  # pickle.UnpicklingError and friends
                raise UserError(f"checkpoint file {f} holds objects a weights-only load refuses "
                                f"({str(e).splitlines()[-1][:200]}); it was not written by distil") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert_main() -> None:
    """`python -c 'from distil.pretrain.checkpoint.manager import convert_main; convert_main()' IN OUT`: DeepSpeed's
    ds_to_universal on a checkpoint folder, torch.load held to weights_only."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    folder, out = sys.argv[1:3]
    args = argparse.Namespace(input_folder=folder, output_folder=out, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_torch_load():
        ds_to_universal.main(args)


def to_universal(folder: Path) -> Path:
    """The universal form of the checkpoint `folder`, converted now unless an earlier resume did (written
    beside, then renamed; older conversions are removed)."""
    root = folder.parent / UNIVERSAL_DIR
    target = root / folder.name
    if (target / COMPLETE).is_file():
        return target
    if root.is_dir():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tmp = root / f".{folder.name}.tmp"
    p = subprocess.run([sys.executable, "-P", "-c", "from distil.pretrain.checkpoint.manager import convert_main; convert_main()",
                        str(folder), str(tmp)], capture_output=True, text=True, env=dict(os.environ))
    if p.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {folder} failed: {tail}")
    (tmp / COMPLETE).write_text(folder.name + "\n")
    tmp.rename(target)
    return target


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


class EngineCheckpoint:
    """The DeepSpeed engine's state (model, optimizer partitions, scheduler, loss scaler) as DeepSpeed's own
    files in the checkpoint folder; read back weights-only."""

    checkpoint_scope: ClassVar[str] = OWN_FILES

    def __init__(self, engine: Any):
        self.engine = engine

    def save_files(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load_files(self, folder: Path, lr_schedule: bool = True) -> None:
        """`lr_schedule=False` keeps the learning-rate schedule where it is (a rollback: the steps go on)."""
        install_weights_only_loading(self.engine)
        try:
            load_path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                       load_optimizer_states=True,
                                                       load_lr_scheduler_states=lr_schedule)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"DeepSpeed could not load the checkpoint in {folder} ({first}): pass another "
                            "checkpoint with --resume PATH, or start a new run") from None
        if load_path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in {folder}")

    def load_files_resharded(self, folder: Path, saved_world_size: int) -> None:
        """Another data-parallel size. Without ZeRO the optimizer state is whole in the model file: the plain
        load. ZeRO-1/2: DeepSpeed's universal checkpoint (the engine must be built with load_universal)."""
        if self.engine.zero_optimization_stage() == 0:
            self.load_files(folder)
            return
        if not self.engine.load_universal_checkpoint():
            raise RuntimeError("the engine must be built with checkpoint.load_universal for this resume")
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            to_universal(folder)
        _barrier()
        universal = folder.parent / UNIVERSAL_DIR / folder.name
        install_weights_only_loading(self.engine)
        with weights_only_torch_load():
            load_path, _ = self.engine.load_checkpoint(str(universal.parent), tag=universal.name,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load the universal checkpoint in {universal}")
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            log.info("optimizer state re-partitioned for %d process(es) from DeepSpeed's universal checkpoint %s",
                     dist.get_world_size() if dist.is_initialized() else 1, universal)


# ---------------------------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Saves and loads `parts` (name -> stateful part) under ckpt_dir; every rank calls save and load.

    Parts are saved and loaded in the mapping's order (put the RNG last: loading the others must not
    draw from it afterwards).
    """

    def __init__(self, ckpt_dir: Path, parts: Mapping[str, Any], *, world_size: int, keep: int):
        for own in (WORLD_SIZE_KEY, FORMAT_KEY):
            if own in parts:
                raise ValueError(f"{own!r} is the checkpoint's own key in {TRAINER_STATE}")
        self.ckpt_dir = Path(ckpt_dir)
        self.parts = dict(parts)
        self.scopes = {name: scope_of(part) for name, part in self.parts.items()}
        self.world_size = world_size
        self.keep = keep

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def path_for(self, step: int) -> Path:
        return self.ckpt_dir / tag_for(step)

    def latest(self) -> Path | None:
        return latest_path(self.ckpt_dir)

    def _states(self, scope: str) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items() if self.scopes[name] == scope}

    def save(self, step: int) -> Path:
        """The checkpoint of `step`, once it is complete and named by `latest` (at once if it already is)."""
        path = self.path_for(step)
        rank = self.rank
        # Rank 0 alone looks at the folder and tells the others: a rank checking it while rank 0 moves a
        # damaged one aside would read a folder that is vanishing under it (and the ranks must agree).
        verdict = None
        if rank == 0:  # ABSENT: no complete checkpoint of this step (maybe a crashed attempt's folder)
            verdict = (damage(path) or INTACT) if (path / COMPLETE).is_file() else ABSENT
        verdict = _from_rank0(verdict)
        if verdict == INTACT:
            return path
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if verdict != ABSENT:  # damaged (verdict says how): kept, under another name
                aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{int(time.time())}")
                path.rename(aside)
                log.warning("checkpoint %s was damaged (%s): moved to %s, saving step %d anew", path, verdict,
                            aside, step)
            elif path.exists():  # a stale, incomplete folder from a crashed attempt at this step
                shutil.rmtree(path)
        _barrier()
        for name, part in self.parts.items():
            if self.scopes[name] == OWN_FILES:
                part.save_files(path)
        atomic_write_json(rank_file(path, rank), self._states(PER_RANK), indent=None)
        if rank == 0:
            atomic_write_json(path / TRAINER_STATE, {**self._states(SHARED), WORLD_SIZE_KEY: self.world_size,
                                                     FORMAT_KEY: CHECKSUMMED_FORMAT})
        _barrier()
        if rank == 0:
            write_checksums(path)
            atomic_write_text(path / COMPLETE, path.name + "\n")
            atomic_write_text(self.ckpt_dir / LATEST, path.name + "\n")
            rotate(self.ckpt_dir, self.keep)
        _barrier()
        return path

    def load(self, path: Path) -> None:
        """Restores every part from the complete checkpoint at `path` (per-rank parts: this rank's share)."""
        shared = read_trainer_state(path)
        if shared[WORLD_SIZE_KEY] != self.world_size:
            self._load_resharded(path, shared)
            return
        per_rank: dict[str, Any] | None = None
        for name, part in self.parts.items():
            scope = self.scopes[name]
            if scope == OWN_FILES:
                part.load_files(path)
                continue
            if scope == PER_RANK and per_rank is None:
                per_rank = json.loads(rank_file(path, self.rank).read_text())
            states = shared if scope == SHARED else per_rank
            assert states is not None
            if name not in states:
                where = TRAINER_STATE if scope == SHARED else rank_file(path, self.rank).name
                raise UserError(f"checkpoint {path} has no {name!r} state in {where}: it was written by "
                                "another version of distil; start a new run or resume with that version")
            part.load_state_dict(states[name])

    def restore_engine(self, path: Path) -> None:
        """A rollback: only the engine's state (weights, optimizer, loss scale) from `path`, written by this
        many processes; the learning-rate schedule, the data position and the counters stay where they are."""
        for name, part in self.parts.items():
            if self.scopes[name] == OWN_FILES:
                part.load_files(path, lr_schedule=False)

    def _load_resharded(self, path: Path, shared: dict[str, Any]) -> None:
        """A checkpoint of another world size: every part must know how to take it (see the docstring)."""
        saved = shared[WORLD_SIZE_KEY]
        for name, part in self.parts.items():
            method = {OWN_FILES: "load_files_resharded", PER_RANK: "load_resharded"}.get(self.scopes[name])
            if method is not None and not hasattr(part, method):
                raise UserError(f"checkpoint {path} was written by {saved} processes, this run has "
                                f"{self.world_size}, and its {name!r} state cannot be re-partitioned: resume "
                                f"with {saved} processes")
        per_rank = [json.loads(rank_file(path, r).read_text()) for r in range(saved)]
        for name, part in self.parts.items():
            scope = self.scopes[name]
            if scope == OWN_FILES:
                part.load_files_resharded(path, saved)
            elif scope == PER_RANK:
                part.load_resharded([states[name] for states in per_rank])
            else:
                part.load_state_dict(shared[name])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


INTACT, ABSENT = "\0intact", "\0absent"  # save()'s verdicts besides a damage() reason


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (the value itself outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
