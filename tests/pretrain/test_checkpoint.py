"""Checkpoint files are read weights-only; `latest` and COMPLETE decide what counts; rotation keeps K."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distil.common.errors import UserError
from distil.pretrain import checkpoint as ckpt

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
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / ckpt.COMPLETE).write_text("x")


def test_resume_auto_reads_latest_and_rotation_keeps_k(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    for s in (10, 20, 30):
        _fake(tmp_path, s)
    _fake(tmp_path, 15, complete=False)  # an abandoned partial write
    (tmp_path / ckpt.LATEST).write_text(ckpt.tag_for(30))
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / ckpt.tag_for(30)
    assert ckpt.resolve_resume(str(tmp_path), tmp_path) == tmp_path / ckpt.tag_for(30)
    with pytest.raises(UserError, match="not a complete"):
        ckpt.resolve_resume(str(tmp_path / ckpt.tag_for(15)), tmp_path)
    ckpt.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ckpt.tag_for(20), ckpt.tag_for(30)]


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
