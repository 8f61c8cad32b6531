"""Fuzzing checkpoints: trainer_state.json, the per-rank JSON, the engine's files, checksums.json and the
`latest` pointer of the newest checkpoint, damaged at random (overwritten, truncated, bytes inserted or
deleted, emptied, replaced, removed).

The promise: `--resume auto` resumes from the newest intact checkpoint (the damaged one is passed over with
a warning, never chosen) or stops with one error line when none is left; a named checkpoint that is damaged
is one error line; nothing in the checkpoint folder is changed by looking; saving the damaged step again
sets the damaged folder aside instead of deleting it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from damage import (
    DEFAULT_CASES,
    SLOW_CASES,
    Damage,
    Outcomes,
    assert_one_line_error,
    byte_damages,
    fuzz_settings,
)
from hypothesis import given

from distil.common.errors import UserError
from distil.pretrain.checkpoint import files as ckfiles
from distil.pretrain.checkpoint import manager as ckpt

ENGINE_FILE = "mp_rank_00_model_states.pt"
FILES = ("trainer_state.json", "rank_00000.json", ENGINE_FILE, "checksums.json", "latest")
OUTCOMES: dict[str, Outcomes] = {}


class TorchFileEngine:
    """Stands in for DeepSpeed: its state is a torch file in the checkpoint folder, loaded weights-only."""

    checkpoint_scope = ckpt.OWN_FILES

    def __init__(self, value: float = 0.0):
        self.weight = torch.full((256,), value)

    def save_files(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight}, folder / ENGINE_FILE)

    def load_files(self, folder: Path) -> None:
        self.weight = torch.load(folder / ENGINE_FILE, weights_only=True)["weight"]


class Position:
    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _manager(root: Path, value: float = 0.0) -> ckpt.CheckpointManager:
    return ckpt.CheckpointManager(root, {"engine": TorchFileEngine(value), "stream": Position(int(value))},
                                  world_size=1, keep=5)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, bytes]:
    """Three checkpoints (steps 10, 20, 30) as bytes by relative path."""
    root = tmp_path_factory.mktemp("checkpoints")
    for step in (10, 20, 30):
        _manager(root, float(step)).save(step)
    yield {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for name, outcomes in OUTCOMES.items():
        outcomes.report(name)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _meaningful(name: str, old: bytes, new: bytes) -> bool:
    """Whether a damage changed what the file says (JSON re-spaced or cut after its last brace says the same)."""
    if new == old:
        return False
    if name.endswith(".json"):
        try:
            return json.loads(new) != json.loads(old)
        except ValueError:
            return True
    return True


def _target(name: str) -> str:
    return name if name == "latest" else f"{ckfiles.tag_for(30)}/{name}"


def check_resume_after(damage: Damage | None, name: str, pristine: dict[str, bytes], root: Path) -> str:
    files = dict(pristine)
    target = _target(name)
    if damage is None:
        del files[target]
    else:
        files[target] = damage.apply(files[target])
    _write(root, files)
    before = _snapshot(root)
    changed = damage is None or _meaningful(name, pristine[target], files[target])
    try:
        path = ckfiles.resolve_resume("auto", root)
    except UserError as error:
        assert_one_line_error(error, str(root))
        outcome = "error"
    else:
        assert path is not None and ckfiles.damage(path) is None
        # (removing checksums.json too: this version's checkpoints say in trainer_state.json that they have one)
        if changed and name != "latest":
            assert path.name != ckfiles.tag_for(30), f"resumed from the damaged checkpoint ({damage})"
        fresh = _manager(root)
        fresh.load(path)  # an intact checkpoint loads
        step = int(path.name.removeprefix(ckfiles.PREFIX))
        assert fresh.parts["stream"].value == step and float(fresh.parts["engine"].weight[0]) == step
        outcome = "newest" if path.name == ckfiles.tag_for(30) else f"fell back to {path.name}"
    assert _snapshot(root) == before, "resolving the resume point changed the checkpoint folder"
    return outcome


def _fuzz(name: str, cases: int, pristine: dict[str, bytes], tmp_path_factory) -> None:
    outcomes = OUTCOMES.setdefault(f"checkpoint {name} ({cases} cases per damage kind)", Outcomes())
    size = len(pristine[_target(name)])
    for kind, strategy in byte_damages(size).items():
        @fuzz_settings(cases)
        @given(damage=strategy)
        def case(damage):
            root = tmp_path_factory.mktemp("resume")
            outcomes[check_resume_after(damage, name, pristine, root)] += 1

        case()
        del kind
    root = tmp_path_factory.mktemp("removed")
    outcomes[check_resume_after(None, name, pristine, root)] += 1


@pytest.mark.parametrize("name", FILES)
def test_damaged_checkpoint_files_fall_back_or_stop_in_one_line(name, pristine, tmp_path_factory):
    _fuzz(name, max(DEFAULT_CASES // 3, 5), pristine, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_damaged_checkpoint_files_slow_tier(name, pristine, tmp_path_factory):
    _fuzz(name, SLOW_CASES // 3, pristine, tmp_path_factory)


def test_every_checkpoint_damaged_is_one_error_and_a_named_one_too(pristine, tmp_path):
    _write(tmp_path, pristine)
    for step in (10, 20, 30):
        engine = tmp_path / ckfiles.tag_for(step) / ENGINE_FILE
        engine.write_bytes(engine.read_bytes()[:-7])
    with pytest.raises(UserError, match="no intact checkpoint") as caught:
        ckfiles.resolve_resume("auto", tmp_path)
    assert_one_line_error(caught.value, "and 2 more")
    with pytest.raises(UserError, match="bytes where .* were written") as caught:
        ckfiles.resolve_resume(str(tmp_path / ckfiles.tag_for(20)), tmp_path)
    assert_one_line_error(caught.value, ckfiles.tag_for(20))


def test_saving_a_damaged_step_again_sets_it_aside(pristine, tmp_path):
    _write(tmp_path, pristine)
    engine = tmp_path / ckfiles.tag_for(30) / ENGINE_FILE
    data = bytearray(engine.read_bytes())
    data[random.Random(0).randrange(len(data))] ^= 0xFF
    engine.write_bytes(bytes(data))
    assert ckfiles.resolve_resume("auto", tmp_path).name == ckfiles.tag_for(20)
    _manager(tmp_path, 30.0).save(30)  # the run, resumed from step 20, reaches step 30 again
    assert ckfiles.damage(tmp_path / ckfiles.tag_for(30)) is None
    aside = list(tmp_path.glob(f"{ckfiles.DAMAGED_PREFIX}{ckfiles.tag_for(30)}-*"))
    assert len(aside) == 1 and (aside[0] / ENGINE_FILE).read_bytes() == bytes(data)  # kept, not deleted
    assert ckfiles.resolve_resume("auto", tmp_path).name == ckfiles.tag_for(30)
