"""Checkpoint files are read weights-only; `latest` and COMPLETE decide what counts; rotation keeps K;
CheckpointManager saves and loads its parts in the same layout as before."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distil.common.errors import UserError
from distil.pretrain.checkpoint import files as ckfiles
from distil.pretrain.checkpoint import manager as ckpt

TOUCHED = Path("/tmp/distil_test_unpickle_ran")


class Payload:
    def __reduce__(self):
        return (TOUCHED.write_text, ("ran",))


def test_checkpoint_loads_refuse_arbitrary_objects(tmp_path):
    TOUCHED.unlink(missing_ok=True)
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload()}, bad)
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())
    ckpt.install_weights_only_loading(engine)
    with pytest.raises(UserError, match="weights-only"):
        engine.checkpoint_engine.load(str(bad))
    assert not TOUCHED.exists()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, good)
    assert engine.checkpoint_engine.load(str(good))["step"] == 3


def _fake(root: Path, step: int, complete: bool = True) -> None:
    """A checkpoint folder with the structure resume checks (one rank), no engine files."""
    d = root / ckfiles.tag_for(step)
    d.mkdir(parents=True)
    (d / ckfiles.TRAINER_STATE).write_text('{"world_size": 1}')
    ckfiles.rank_file(d, 0).write_text("{}")
    if complete:
        (d / ckfiles.COMPLETE).write_text("x")


def test_resume_auto_reads_latest_and_rotation_keeps_k(tmp_path):
    assert ckfiles.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    for s in (10, 20, 30):
        _fake(tmp_path, s)
    _fake(tmp_path, 15, complete=False)  # an abandoned partial write
    (tmp_path / ckfiles.LATEST).write_text(ckfiles.tag_for(30))
    assert ckfiles.resolve_resume("auto", tmp_path) == tmp_path / ckfiles.tag_for(30)
    assert ckfiles.resolve_resume(str(tmp_path), tmp_path) == tmp_path / ckfiles.tag_for(30)
    with pytest.raises(UserError, match="no COMPLETE marker"):
        ckfiles.resolve_resume(str(tmp_path / ckfiles.tag_for(15)), tmp_path)
    ckfiles.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ckfiles.tag_for(20), ckfiles.tag_for(30)]


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class FakeEngine:
    """Stands in for the DeepSpeed adapter: writes one file of its own into the checkpoint folder."""

    checkpoint_scope = ckpt.OWN_FILES

    def __init__(self, weight: float = 0.0):
        self.weight = weight

    def save_files(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "engine.txt").write_text(str(self.weight))

    def load_files(self, folder: Path) -> None:
        self.weight = float((folder / "engine.txt").read_text())


class FakeStream:
    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def _parts(weight: float = 0.0, step: int = 0, position: int = 0, run_id: str | None = None):
    from distil.pretrain.checkpoint.state import Counters, TrackerRun

    run = TrackerRun()
    run.load_state_dict(run_id)
    return {"engine": FakeEngine(weight), "counters": Counters(step=step, epoch=1), "run_id": run,
            "stream": FakeStream(position), "rng": ckpt.RNGState()}


def test_manager_round_trip_keeps_the_layout(tmp_path):
    parts = _parts(weight=2.5, step=7, position=11, run_id="abc")
    manager = ckpt.CheckpointManager(tmp_path, parts, world_size=1, keep=2)
    path = manager.save(7)
    assert path == tmp_path / ckfiles.tag_for(7) and manager.latest() == path
    assert (tmp_path / ckfiles.LATEST).read_text().strip() == ckfiles.tag_for(7)
    assert (path / ckfiles.COMPLETE).is_file() and (path / "engine.txt").is_file()
    shared = ckfiles.read_trainer_state(path)
    assert list(shared) == ["counters", "run_id", "world_size", "checkpoint_format"]
    assert shared["counters"]["step"] == 7 and shared["run_id"] == "abc" and shared["world_size"] == 1
    assert shared["checkpoint_format"] == 2  # written with checksums.json: losing it is damage
    rank_state = json.loads((path / "rank_00000.json").read_text())
    assert list(rank_state) == ["stream", "rng"] and rank_state["stream"] == {"position": 11}
    a = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh = _parts()
    ckpt.CheckpointManager(tmp_path, fresh, world_size=1, keep=2).load(path)
    assert fresh["engine"].weight == 2.5 and fresh["stream"].position == 11
    assert fresh["counters"].step == 7 and fresh["counters"].epoch == 1 and fresh["run_id"].resumed_id == "abc"
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a  # the RNG continues where it was


def test_manager_saves_a_step_once_replaces_stale_folders_and_rotates(tmp_path):
    parts = _parts(weight=1.0)
    manager = ckpt.CheckpointManager(tmp_path, parts, world_size=1, keep=2)
    stale = tmp_path / ckfiles.tag_for(3)
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")  # a crashed attempt at step 3
    manager.save(3)
    assert not (stale / "junk").exists() and (stale / ckfiles.COMPLETE).is_file()
    parts["engine"].weight = 9.0
    manager.save(3)  # already complete: left as it is
    assert (stale / "engine.txt").read_text() == "1.0"
    for step in (4, 5):
        manager.save(step)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ckfiles.tag_for(4), ckfiles.tag_for(5)]


def test_manager_load_errors_are_user_errors(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path, _parts(), world_size=1, keep=2)
    path = manager.save(1)
    with pytest.raises(UserError, match="written by 1 processes, this run has 2"):
        ckpt.CheckpointManager(tmp_path, _parts(), world_size=2, keep=2).load(path)
    extra = {**_parts(), "sampler": FakeStream()}
    with pytest.raises(UserError, match="no 'sampler' state"):
        ckpt.CheckpointManager(tmp_path, extra, world_size=1, keep=2).load(path)
    with pytest.raises(ValueError):
        ckpt.CheckpointManager(tmp_path, {**_parts(), "world_size": FakeStream()}, world_size=1, keep=2)


def test_manager_reads_checkpoints_written_before_it(tmp_path):
    """The layout of the function-based writer (no trailing newline, and the elapsed_s counter that was
    never used) still loads."""
    path = tmp_path / ckfiles.tag_for(4)
    path.mkdir()
    (path / "engine.txt").write_text("3.0")
    counters = {"step": 4, "epoch": 0, "micro_steps": 8, "samples": 64, "tokens": 900, "skipped_steps": 0,
                "nonfinite_in_row": 0, "elapsed_s": 0.0}
    (path / ckfiles.TRAINER_STATE).write_text(json.dumps({"counters": counters, "run_id": None, "world_size": 1},
                                                      indent=2))
    (path / "rank_00000.json").write_text(json.dumps({"stream": {"position": 5}, "rng": ckpt.rng_state()}))
    (path / ckfiles.COMPLETE).write_text(ckfiles.tag_for(4) + "\n")
    (tmp_path / ckfiles.LATEST).write_text(ckfiles.tag_for(4) + "\n")
    parts = _parts()
    ckpt.CheckpointManager(tmp_path, parts, world_size=1, keep=2).load(ckfiles.resolve_resume("auto", tmp_path))
    assert parts["counters"].micro_steps == 8 and parts["stream"].position == 5 and parts["engine"].weight == 3.0
    assert parts["run_id"].state_dict() is None


def test_engine_adapter_reads_weights_only_and_reports_a_failed_load(tmp_path):
    calls = []

    class Engine:
        checkpoint_engine = SimpleNamespace()

        def save_checkpoint(self, save_dir, tag, save_latest):
            calls.append(("save", save_dir, tag, save_latest))

        def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
            calls.append(("load", load_dir, tag, load_optimizer_states, load_lr_scheduler_states))
            return None, None

    engine = Engine()
    adapter = ckpt.EngineCheckpoint(engine)
    adapter.save_files(tmp_path / ckfiles.tag_for(2))
    with pytest.raises(UserError, match="DeepSpeed could not load"):
        adapter.load_files(tmp_path / ckfiles.tag_for(2))
    assert calls == [("save", str(tmp_path), ckfiles.tag_for(2), False),
                     ("load", str(tmp_path), ckfiles.tag_for(2), True, True)]
    assert callable(engine.checkpoint_engine.load)  # reads go through torch.load(weights_only=True)


def test_a_checkpoint_that_lost_its_checksums_is_damaged_an_older_one_is_said_once(tmp_path, caplog):
    """Deleting checksums.json must not make damage invisible: this version's checkpoints record that they
    carry it. One written before checksums existed (no format in trainer_state.json) still loads, said once."""
    path = ckpt.CheckpointManager(tmp_path, _parts(step=5), world_size=1, keep=3).save(5)
    (path / ckfiles.CHECKSUMS).unlink()
    assert ckfiles.damage(path) == "checksums.json is missing (this checkpoint was written with one)"

    state = json.loads((path / ckfiles.TRAINER_STATE).read_text())
    del state["checkpoint_format"]  # as an older version wrote it
    (path / ckfiles.TRAINER_STATE).write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="distil.train"):
        assert ckfiles.damage(path) is None and ckfiles.damage(path) is None
    said = [r for r in caplog.records if "only its structure is checked" in r.getMessage()]
    assert len(said) == 1, caplog.text


def _save_over_a_damaged_step(rank: int, port: int, root: str, result: str) -> None:
    """One process of a 2-process gloo job saving step 4 over a damaged checkpoint of step 4, where rank 1
    sees the folder as intact (a network filesystem's stale view): rank 0's verdict must rule on both."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 1:
        ckpt.damage = lambda path: None  # this rank's own look would call it intact and skip the save
    manager = ckpt.CheckpointManager(Path(root), _parts(weight=4.0, step=4), world_size=2, keep=3)
    path = manager.save(4)
    dist.barrier()
    Path(result, f"rank{rank}").write_text(str(path))
    dist.destroy_process_group()


def test_every_rank_follows_rank_0s_verdict_on_a_damaged_checkpoint_of_the_step(tmp_path):
    """The step being saved has a damaged checkpoint already (a resume passed over it): rank 0 alone judges
    the folder and moves it aside, and every rank writes the step anew. Ranks judging it themselves read a
    folder vanishing under them (CI saw FileNotFoundError in rank 1's check) or disagree and hang."""
    import multiprocessing

    from mlflow_test_server import free_port

    root, result = tmp_path / "checkpoints", tmp_path / "result"
    root.mkdir(), result.mkdir()
    old = root / ckfiles.tag_for(4)
    old.mkdir()
    (old / ckfiles.TRAINER_STATE).write_text('{"world_size": 2, "checkpoint_format": 2}')
    for r in range(2):
        ckfiles.rank_file(old, r).write_text("{}")
    (old / ckfiles.COMPLETE).write_text("x")  # no checksums.json though written with them: damaged

    context = multiprocessing.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=_save_over_a_damaged_step, args=(r, port, str(root), str(result)))
               for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert {(result / f"rank{r}").read_text() for r in range(2)} == {str(old)}
    assert ckfiles.damage(old) is None and (old / "engine.txt").read_text() == "4.0"
    assert all(ckfiles.rank_file(old, r).is_file() for r in range(2))
    aside = [p.name for p in root.iterdir() if p.name.startswith(ckpt.DAMAGED_PREFIX)]
    assert len(aside) == 1 and aside[0].startswith(f"{ckpt.DAMAGED_PREFIX}{old.name}-"), aside
