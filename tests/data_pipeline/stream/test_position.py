"""data_pipeline/stream/position.py directly: a saved position's round trip, which setting changes a resume
takes (the global layout's rank and world size, at an update boundary of the same global batch) and which
are one error line, the mapping of a global position onto a rank, and the upgrade of version-1 states."""

from __future__ import annotations

import pytest

from distil.common.errors import UserError
from distil.data_pipeline.stream.position import (
    STATE_VERSION,
    Position,
    global_batches_taken,
    rank_position,
    restored_position,
    resumes_elsewhere,
    saved_state,
    upgrade_state,
)

CONFIG = {"layout": "global", "rank": 0, "world_size": 2, "per_update": 2, "seed": 3}


def test_a_saved_position_comes_back_as_it_was():
    pos = Position(epoch=1, chunk=4, batch_in_chunk=3, batches=8, pass_batches={0: 12, 1: 5})
    state = saved_state(pos, world_size=2, per_update=2, global_layout=True, stats={"samples": 9}, config=CONFIG)
    assert state["version"] == STATE_VERSION and state["global_batches"] == 16  # 8 batches x 2 ranks, a boundary
    assert restored_position(state) == pos
    off_boundary = saved_state(Position(batches=7), world_size=2, per_update=2, global_layout=True, stats={},
                               config=CONFIG)
    assert off_boundary["global_batches"] is None


def test_only_the_global_layouts_rank_and_world_size_may_change():
    assert not resumes_elsewhere(CONFIG, dict(CONFIG))
    assert resumes_elsewhere(CONFIG, {**CONFIG, "rank": 1, "world_size": 4, "per_update": 1})
    with pytest.raises(UserError, match=r"seed: saved 3, now 4"):
        resumes_elsewhere(CONFIG, {**CONFIG, "seed": 4})
    per_rank = {**CONFIG, "layout": "per_rank"}
    with pytest.raises(UserError, match=r"world_size: saved 2, now 4.*resume with the saved settings"):
        resumes_elsewhere(per_rank, {**per_rank, "world_size": 4})


def test_a_global_position_maps_onto_any_rank_of_the_same_global_batch():
    state = {"config": {"world_size": 2, "per_update": 2}, "global_batches": 16}
    assert global_batches_taken(state, world_size=4, per_update=1) == 16
    with pytest.raises(UserError, match=r"2 processes x 2 micro-batches per update = 4 batches per update; this run takes 3 x 1 = 3"):
        global_batches_taken(state, world_size=3, per_update=1)
    with pytest.raises(UserError, match="not saved at an update boundary"):
        global_batches_taken({**state, "global_batches": None}, world_size=4, per_update=1)
    # 16 batches taken; a pass is 3 chunks of 5 batches; rank 3 of 4 (one micro-batch per update) next reads
    # global batch 19: the second pass (chunk 3 counted over passes), batch 4 of it; 4 batches of its own so far
    pos = rank_position(2, 16, rank=3, world_size=4, per_update=1, chunk_batches=(5, 5, 5))
    assert (pos.epoch, pos.chunk, pos.batch_in_chunk, pos.batches) == (2, 3, 4, 4)
    first = rank_position(2, 16, rank=0, world_size=4, per_update=1, chunk_batches=(5, 5, 5))
    assert (first.chunk, first.batch_in_chunk) == (3, 1)


def test_version_1_states_upgrade_where_they_mean_the_same():
    v1 = {"version": 1, "epoch": 0, "chunk": 0, "batch_in_chunk": 2, "batches": 2, "pass_batches": {},
          "config": {"world_size": 1}}
    up = upgrade_state(v1, world_size=1, per_update=1, layout="global")
    assert up["version"] == STATE_VERSION and up["global_batches"] == 2 and up["config"]["layout"] == "global"
    with pytest.raises(UserError, match="version 1 is not"):
        upgrade_state({**v1, "config": {"world_size": 2}}, world_size=2, per_update=1, layout="global")
