"""Fuzzing real checkpoints: the ones `distil train` writes through DeepSpeed (ZeRO-1 in one process, ZeRO-2 in
two through the DeepSpeed launcher), not a stand-in engine's (test_fuzz_checkpoints.py).

Every file of the newest checkpoint (the model states, ZeRO's optimizer shards, the per-rank stream
states, the counters in trainer_state.json, checksums.json, COMPLETE) and the `latest` pointer are damaged at
random or removed: `--resume auto` must pass over the damaged checkpoint for the one before (or, for
`latest`, still take the newest), and looking changes nothing. End to end, a 2-process run resumed over its
damaged newest checkpoint finishes with exactly the weights and metrics of the same run resumed from the
checkpoint before it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from damage import DEFAULT_CASES, Outcomes, byte_damages, fuzz_settings
from distributed_helpers import REPO, env, free_port, make_shards
from hypothesis import given
from safetensors.torch import load_file

from distil.common.errors import UserError
from distil.pretrain.checkpoint import files as ckfiles

pytestmark = pytest.mark.slow

SETUPS = {"zero1-1proc": ("1", "1"), "zero2-2procs": ("2", "2")}  # name: (processes, ZeRO stage)
NEWEST, BEFORE = ckfiles.tag_for(6), ckfiles.tag_for(4)
OUTCOMES: dict[str, Outcomes] = {}


def train(shards: Path, out: Path, procs: str, stage: str, *extra: str, status: int = 0) -> str:
    """launch/local.sh as a user runs it (resumes from the newest intact checkpoint when there is one)."""
    e = env()
    e.update(NUM_GPUS=procs, MASTER_PORT=str(free_port()))
    p = subprocess.run(["bash", "launch/local.sh", "configs/tiny_mlm_cpu.yaml", f"data.shards={shards}",
                        f"run.output_dir={out}", "run.max_steps=8", "run.log_every=1", "checkpoint.every=2",
                        "checkpoint.keep=5", f"engine.zero_stage={stage}", *extra],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=420)
    assert p.returncode == status, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Per setup, a run stopped after 6 of its 8 steps (exit 3): checkpoints at steps 2, 4 and 6."""
    shards = make_shards(tmp_path_factory.mktemp("data"))
    made = {}
    for name, (procs, stage) in SETUPS.items():
        out = tmp_path_factory.mktemp(name) / "run"
        train(shards, out, procs, stage, "run.stop_after_steps=6", status=3)
        assert (out / "checkpoints" / "latest").read_text().strip() == NEWEST
        made[name] = out
    made["shards"] = shards
    yield made
    for title, outcomes in OUTCOMES.items():
        outcomes.report(title)


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    names = sorted(p.name for p in (ckpt_dir / NEWEST).iterdir())
    return [f"{NEWEST}/{n}" for n in names] + ["latest"]


def test_the_real_checkpoints_hold_what_the_fuzz_damages(runs):
    """So that each case below damages what it says: ZeRO's shards, one stream state per rank, checksums."""
    for name, (procs, _) in SETUPS.items():
        files = checkpoint_files(runs[name] / "checkpoints")
        shards = [f for f in files if f.endswith("_optim_states.pt")]
        assert len(shards) == int(procs), files  # ZeRO 1 and 2 partition the optimizer over the ranks
        assert sum(f.endswith(".json") and "/rank_" in f for f in files) == int(procs)
        listed = json.loads((runs[name] / "checkpoints" / NEWEST / "checksums.json").read_text())
        assert {f"{NEWEST}/{n}" for n in listed} == {f for f in files if f.endswith((".pt", ".json"))} - {
            f"{NEWEST}/checksums.json"}
        state = json.loads((runs[name] / "checkpoints" / NEWEST / "trainer_state.json").read_text())
        assert state["counters"]["step"] == 6 and state["world_size"] == int(procs)


def _copy(source: Path, dest: Path, damaged: str, data: bytes | None) -> None:
    """The checkpoints folder with one file replaced by `data` (None: removed); the rest hard-linked."""
    for path in source.rglob("*"):
        rel = str(path.relative_to(source))
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == damaged:
            if data is not None:
                target.write_bytes(data)
        else:
            os.link(path, target)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def check(source: Path, root: Path, rel: str, data: bytes | None) -> str:
    original = (source / rel).read_bytes()
    _copy(source, root, rel, data)
    before = _snapshot(root)
    try:
        path = ckfiles.resolve_resume("auto", root)
    except UserError as error:  # only when nothing intact is left, which a single damage cannot cause
        raise AssertionError(f"{rel}: no checkpoint to resume from ({error})") from None
    assert path is not None and ckfiles.damage(path) is None
    if rel == "latest":
        # a hint: a pointer that names no complete checkpoint is passed over for the newest intact one
        named = (data or b"").decode(errors="replace").strip()
        assert path.name == (named if named in ckfiles.complete_tags(root) else NEWEST)
    elif rel.endswith(ckfiles.COMPLETE) and data is not None:
        assert path.name == NEWEST  # the marker's presence is what counts; its text is for people
    elif data is None or data != original:
        assert path.name == BEFORE, f"{rel} damaged, yet {path.name} was taken"
    assert _snapshot(root) == before, "resolving the resume point changed the checkpoint folder"
    return "newest" if path.name == NEWEST else f"fell back to {path.name}"


def _fuzz_file(source: Path, rel: str, outcomes: Outcomes, tmp_path_factory) -> None:
    original = (source / rel).read_bytes()
    for strategy in byte_damages(len(original)).values():
        @fuzz_settings(max(DEFAULT_CASES // 10, 3))
        @given(damage=strategy)
        def case(damage):
            outcomes[check(source, tmp_path_factory.mktemp("ckpt"), rel, damage.apply(original))] += 1

        case()
    outcomes[check(source, tmp_path_factory.mktemp("ckpt"), rel, None)] += 1


@pytest.mark.parametrize("setup", list(SETUPS))
def test_damaged_real_checkpoint_files_fall_back_to_the_one_before(setup, runs, tmp_path_factory):
    source = runs[setup] / "checkpoints"
    for rel in checkpoint_files(source):
        outcomes = OUTCOMES.setdefault(f"real checkpoint {setup} {rel.split('/')[-1]}", Outcomes())
        _fuzz_file(source, rel, outcomes, tmp_path_factory)


def test_a_resume_over_a_damaged_newest_checkpoint_equals_one_from_the_checkpoint_before(runs, tmp_path):
    """Two processes, ZeRO-2: rank 1's optimizer shard of step 6 loses one byte's worth of truth. The resume
    passes over step 6 with a warning and, from step 4, finishes exactly as the same run resumed from step
    4 with step 6 never written."""
    source = runs["zero2-2procs"]
    damaged, reference = tmp_path / "damaged", tmp_path / "reference"
    shutil.copytree(source, damaged)
    shutil.copytree(source, reference)
    shard = next((damaged / "checkpoints" / NEWEST).glob("*rank_1_*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    shutil.rmtree(reference / "checkpoints" / NEWEST)
    (reference / "checkpoints" / "latest").write_text(BEFORE + "\n")
    log = train(runs["shards"], damaged, "2", "2")
    assert NEWEST in log and shard.name in log, log[-3000:]  # the warning names the checkpoint and the file
    train(runs["shards"], reference, "2", "2")
    a, b = load_file(damaged / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [(damaged / "metrics.jsonl").read_text().splitlines(), (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [[json.loads(x)["step"] for x in ls] for ls in lines]
    assert steps[0] == steps[1] == list(range(1, 9))
    losses = [[json.loads(x)["loss"] for x in ls] for ls in lines]
    assert losses[0] == losses[1]
