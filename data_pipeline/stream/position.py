"""The position in a PretrainStream, the counts kept with it (StreamStats) and their saved form (state_dict),
read back on resume.

A position is (epoch, chunk index, batches already taken from that chunk); see stream.py's docstring for the
layouts. A saved position resumes only with the settings it was saved with, except in the global layout:
there a position saved at an update boundary by any rank of any world size with the same world_size x
micro_batches_per_update is mapped onto the loading rank ("elastic" resume). Version 1 states (per-rank
ranges only) are upgraded where both versions mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distil.common.errors import UserError
from distil.data_pipeline.stream.plan import ChunkStats

STATE_VERSION = 2  # 2: layouts (1: per-rank ranges only)
ELASTIC_KEYS = ("rank", "world_size", "per_update")  # may change between save and load (global layout)


@dataclass
class StreamStats:
    samples: int = 0
    tokens: int = 0
    batches: int = 0
    skipped_samples: int = 0
    skipped_shards: int = 0
    extra_passes: int = 0  # times a rank re-read its range to fill its batch count (max_tokens, corruption)

    def add_chunk(self, chunk: ChunkStats) -> None:
        self.skipped_samples += chunk.skipped_samples
        self.skipped_shards += chunk.skipped_shards


@dataclass
class Position:
    epoch: int = 0
    chunk: int = 0
    batch_in_chunk: int = 0
    batches: int = 0  # batches yielded in this epoch
    pass_batches: dict[int, int] = field(default_factory=dict)  # batches made per pass (hang guard)


def saved_state(pos: Position, *, world_size: int, per_update: int, global_layout: bool, stats: dict[str, int],
                config: dict[str, Any]) -> dict[str, Any]:
    """The state_dict of a stream at `pos`; `config` is the stream's settings (checked on load)."""
    at_boundary = global_layout and pos.batches % per_update == 0
    return {
        "version": STATE_VERSION,
        "epoch": pos.epoch,
        "chunk": pos.chunk,
        "batch_in_chunk": pos.batch_in_chunk,
        "batches": pos.batches,
        # batches of the epoch's global sequence taken by all ranks together (at an update boundary)
        "global_batches": pos.batches * world_size if at_boundary else None,
        "pass_batches": {str(k): v for k, v in pos.pass_batches.items()},
        "stats": stats,
        "config": config,
    }


def upgrade_state(state: dict[str, Any], *, world_size: int, per_update: int, layout: str) -> dict[str, Any]:
    """Version 1 states hold per-rank ranges: the per-rank layout, or the global one for a single process
    (where both layouts are one)."""
    version = state.get("version")
    alone = state["config"].get("world_size") == 1 and world_size == 1
    if version == 1 and (alone or layout != "global"):
        config = {**state["config"], "per_update": per_update, "layout": layout}
        return {**state, "version": STATE_VERSION, "config": config,
                "global_batches": state["batches"] if per_update == 1 else None}
    if version != STATE_VERSION:
        raise UserError(f"data loader state version {version!r} is not {STATE_VERSION} (written by another "
                        "version of distil with another data layout): resume with that version, or start over")
    return state


def resumes_elsewhere(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a state saved with settings `saved` is a global position to map onto this rank (True) or this
    rank's own (False); any other change of settings is an error."""
    changed = [k for k in current if saved.get(k) != current[k]]
    if (changed and current["layout"] == "global" and saved.get("layout") == "global"
            and set(changed) <= set(ELASTIC_KEYS)):
        return True
    if changed:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in changed)
        raise UserError(f"cannot resume the data position ({details}): resume with the saved settings")
    return False


def restored_position(state: dict[str, Any]) -> Position:
    """The position a state saved by this rank holds."""
    return Position(
        epoch=int(state["epoch"]),
        chunk=int(state["chunk"]),
        batch_in_chunk=int(state["batch_in_chunk"]),
        batches=int(state["batches"]),
        pass_batches={int(k): int(v) for k, v in state["pass_batches"].items()},
    )


def global_batches_taken(state: dict[str, Any], *, world_size: int, per_update: int) -> int:
    """The global position of a state saved by another rank / world size: batches of the epoch's global
    sequence taken by all ranks together; it must be at an update boundary of the same global batch."""
    saved = state["config"]
    group = world_size * per_update
    if saved["world_size"] * saved["per_update"] != group:
        raise UserError(
            f"the data position was saved with {saved['world_size']} processes x {saved['per_update']} "
            f"micro-batches per update = {saved['world_size'] * saved['per_update']} batches per update; this "
            f"run takes {world_size} x {per_update} = {group}: keep the global batch (set "
            "engine.gradient_accumulation_steps)")
    position = state.get("global_batches")
    if position is None or position % group:
        raise UserError("the data position was not saved at an update boundary: resume with the saved number "
                        f"of processes ({saved['world_size']})")
    return position


def rank_position(epoch: int, taken: int, *, rank: int, world_size: int, per_update: int,
                  chunk_batches: tuple[int, ...]) -> Position:
    """This rank's position in `epoch` once all ranks together have taken `taken` batches of the global
    sequence (at an update boundary); chunk_batches: the batches each chunk of one pass makes."""
    first = taken + rank * per_update  # this rank's next batch in the global sequence
    passes, within = divmod(first, sum(chunk_batches))
    chunk = 0
    while within >= chunk_batches[chunk]:
        within -= chunk_batches[chunk]
        chunk += 1
    return Position(epoch=epoch, chunk=passes * len(chunk_batches) + chunk, batch_in_chunk=within,
                    batches=taken // (world_size * per_update) * per_update)
