"""Atomic, resumable checkpoints: `CheckpointManager` saves and loads a mapping of stateful parts.

Owns the on-disk layout (a shared filesystem when multi-node, as DeepSpeed requires):

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

A checkpoint counts only when it is complete and named by `latest`; a crash mid-write leaves a folder that
is never read and is removed by the next rotation. Before a resume every file is checked against
checksums.json (and the JSON files parsed): `--resume auto` takes the newest intact checkpoint, saying which
damaged ones it passed over, and leaves those as they are; a damaged checkpoint of a step saved again is
renamed aside (`damaged-step_...`), never deleted. Loading never unpickles arbitrary objects: every torch
file is read with `weights_only=True`, DeepSpeed's loss-scaler and fragment-address classes (plain records) being the only
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
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.distributed as dist

from distil.common.errors import UserError
from distil.common.files import atomic_write_json, atomic_write_text

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
PREFIX = "step_"
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside when its step is saved again
log = logging.getLogger("distil.train")
WORLD_SIZE_KEY = "world_size"  # kept in trainer_state.json beside the shared parts; resume checks it
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


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


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
    """`python -c 'from distil.pretrain.checkpoint import convert_main; convert_main()' IN OUT`: DeepSpeed's
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
    p = subprocess.run([sys.executable, "-c", "from distil.pretrain.checkpoint import convert_main; convert_main()",
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

    def load_files(self, folder: Path) -> None:
        install_weights_only_loading(self.engine)
        try:
            load_path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
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


# ----------------------------------------------------------------------------------- finding checkpoints
def complete_tags(ckpt_dir: Path) -> list[str]:
    tags = [p.name for p in ckpt_dir.glob(f"{PREFIX}*") if (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_path(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names in ckpt_dir, or None when none is written yet (or it names none)."""
    name = _latest_name(ckpt_dir)
    return ckpt_dir / name if name is not None else None


def _latest_name(ckpt_dir: Path) -> str | None:
    try:
        name = (ckpt_dir / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return name if name.startswith(PREFIX) and "/" not in name else None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def write_checksums(path: Path) -> None:
    """Size and CRC-32 of every file of the checkpoint (rank 0, once all ranks have written theirs)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (COMPLETE, CHECKSUMS)
                   and not p.name.startswith("."))
    atomic_write_json(path / CHECKSUMS, {str(p.relative_to(path)): [p.stat().st_size, _crc32(p)] for p in files})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is intact.

    Checks the COMPLETE marker, that trainer_state.json and every rank's JSON parse, and, where the
    checkpoint has checksums.json (all written by this version), every file's size and CRC-32."""
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker" if path.is_dir() else "missing"
    state = _read_json(path / TRAINER_STATE)
    world = state.get(WORLD_SIZE_KEY) if isinstance(state, dict) else None
    if not isinstance(world, int) or world < 1:
        return f"{TRAINER_STATE} is unreadable or holds no {WORLD_SIZE_KEY}"
    for rank in range(world):
        if not isinstance(_read_json(rank_file(path, rank)), dict):
            return f"{rank_file(path, rank).name} is missing or unreadable"
    if not (path / CHECKSUMS).exists():
        return None  # written before checksums existed: the structure is all there is to check
    sums = _read_json(path / CHECKSUMS)
    if not isinstance(sums, dict) or not sums:
        return f"{CHECKSUMS} is unreadable"
    unlisted = [p.name for p in path.rglob("*") if p.is_file() and p.name not in (COMPLETE, CHECKSUMS)
                and not p.name.startswith(".") and str(p.relative_to(path)) not in sums]
    if unlisted:
        return f"{unlisted[0]} is not in {CHECKSUMS}"
    for name, entry in sums.items():
        file = path / name
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, int) for v in entry)):
            return f"{CHECKSUMS} is unreadable"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry[0]:
            return f"{name} has {file.stat().st_size} bytes where {entry[0]} were written"
        if _crc32(file) != entry[1]:
            return f"{name} differs from what was written (CRC-32)"
    return None


def _newest_intact(ckpt_dir: Path) -> Path | None:
    """--resume auto: the checkpoint `latest` names, else the newest complete one, passing over damaged
    ones (named in a warning, left as they are). None when there is nothing to resume from."""
    tags = complete_tags(ckpt_dir)
    pointer = _latest_name(ckpt_dir)
    passed: list[str] = []
    if pointer in tags:
        candidates = sorted((t for t in tags if t <= pointer), reverse=True)
    else:
        candidates = sorted(tags, reverse=True)
        if (ckpt_dir / LATEST).exists():
            passed.append(f"{LATEST} names no complete checkpoint")
    for tag in candidates:
        why = damage(ckpt_dir / tag)
        if why is None:
            if passed and os.environ.get("RANK", "0") == "0":
                log.warning("resuming from %s, the newest intact checkpoint; passed over (left as they are): %s",
                            ckpt_dir / tag, "; ".join(passed))
            return ckpt_dir / tag
        passed.append(f"{tag}: {why}")
    if passed:
        detail = passed[0]
        raise UserError(f"no intact checkpoint to resume from in {ckpt_dir} ({detail}"
                        f"{f'; and {len(passed) - 1} more' if len(passed) > 1 else ''}): restore the folder "
                        "from a backup, or start a new run with another run.output_dir")
    return None


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """--resume auto: the newest intact checkpoint in ckpt_dir (None if there is none yet); PATH: that one
    (a checkpoint folder, or a checkpoints folder with its `latest`), which must be intact."""
    if resume is None:
        return None
    if resume == "auto":
        return _newest_intact(ckpt_dir)
    path = Path(resume)
    if path.is_dir() and (path / LATEST).exists() and not (path / COMPLETE).exists():
        found = _newest_intact(path)
        if found is None:
            raise UserError(f"{path} holds no checkpoint to resume from: pass a checkpoint folder or --resume auto")
        return found
    why = damage(path)
    if why is not None:
        raise UserError(f"checkpoint {path} cannot be resumed from ({why}): pass another checkpoint folder, "
                        "or --resume auto to take the newest intact one")
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


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.json"


# ---------------------------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Saves and loads `parts` (name -> stateful part) under ckpt_dir; every rank calls save and load.

    Parts are saved and loaded in the mapping's order (put the RNG last: loading the others must not
    draw from it afterwards).
    """

    def __init__(self, ckpt_dir: Path, parts: Mapping[str, Any], *, world_size: int, keep: int):
        if WORLD_SIZE_KEY in parts:
            raise ValueError(f"{WORLD_SIZE_KEY!r} is the checkpoint's own key in {TRAINER_STATE}")
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
        why = damage(path) if (path / COMPLETE).is_file() else None
        if (path / COMPLETE).is_file() and why is None:
            return path
        rank = self.rank
        if rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if why is not None:  # a damaged checkpoint of this step: kept, under another name
                aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{int(time.time())}")
                path.rename(aside)
                log.warning("checkpoint %s was damaged (%s): moved to %s, saving step %d anew", path, why,
                            aside, step)
            elif path.exists():  # a stale, incomplete folder from a crashed attempt at this step
                shutil.rmtree(path)
        _barrier()
        for name, part in self.parts.items():
            if self.scopes[name] == OWN_FILES:
                part.save_files(path)
        atomic_write_json(rank_file(path, rank), self._states(PER_RANK), indent=None)
        if rank == 0:
            atomic_write_json(path / TRAINER_STATE, {**self._states(SHARED), WORLD_SIZE_KEY: self.world_size})
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


def saved_world_size(path: Path) -> int:
    return int(read_trainer_state(path)[WORLD_SIZE_KEY])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
