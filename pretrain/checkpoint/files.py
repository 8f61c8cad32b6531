"""The checkpoints folder on disk, apart from what a checkpoint holds: the names of its files, finding the
checkpoint to resume from, checksums and damage detection, and rotation (checkpoint.py writes and reads the
state; its docstring shows the layout).

A checkpoint counts only when it is complete and named by `latest`; a crash mid-write leaves a folder that
is never read and is removed by the next rotation. Before a resume every file is checked against
checksums.json (and the JSON files parsed): `--resume auto` takes the newest intact checkpoint, saying which
damaged ones it passed over, and leaves those as they are; a damaged checkpoint of a step saved again is
renamed aside (`damaged-step_...`, by CheckpointManager.save), never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

from distil.common.errors import UserError
from distil.common.files import atomic_write_json

log = logging.getLogger("distil.train")

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
PREFIX = "step_"
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside when its step is saved again
WORLD_SIZE_KEY = "world_size"  # kept in trainer_state.json beside the shared parts; resume checks it
FORMAT_KEY = "checkpoint_format"  # trainer_state.json: 2 = written with checksums.json (absent: older)
CHECKSUMMED_FORMAT = 2
_said_unverified: set[Path] = set()


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.json"


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def saved_world_size(path: Path) -> int:
    return int(read_trainer_state(path)[WORLD_SIZE_KEY])


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

    Checks the COMPLETE marker, that trainer_state.json and every rank's JSON parse, and every file's size and
    CRC-32 against checksums.json. A checkpoint written with checksums that has lost the file is damaged (deleting
    it would otherwise hide any damage); one from before checksums existed (no format in trainer_state.json)
    is checked for its structure only, which is said once."""
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
        if state.get(FORMAT_KEY, 1) >= CHECKSUMMED_FORMAT:
            return f"{CHECKSUMS} is missing (this checkpoint was written with one)"
        if path not in _said_unverified:
            _said_unverified.add(path)
            log.warning("checkpoint %s was written before checkpoints carried %s: only its structure is checked",
                        path, CHECKSUMS)
        return None
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

