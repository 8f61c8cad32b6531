"""The trainer's own checkpointed parts, both in trainer_state.json: `Counters` (how far training has come)
and `TrackerRun` (the tracker's run id, so a resumed run appends to the same run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from distil.pretrain.checkpoint.manager import SHARED


@dataclass
class Counters:
    """Training progress, the same on every rank (trainer_state.json "counters")."""

    checkpoint_scope: ClassVar[str] = SHARED

    step: int = 0  # optimizer steps taken (applied or skipped by the loss scaler)
    epoch: int = 0
    micro_steps: int = 0
    samples: int = 0  # sequences seen, all ranks
    tokens: int = 0  # non-pad tokens seen, all ranks
    skipped_steps: int = 0  # steps whose update was skipped (non-finite)
    nonfinite_in_row: int = 0
    restarts: int = 0  # times this run was resumed from a checkpoint
    rollbacks: int = 0  # times a non-finite streak was rolled back (run.on_nonfinite=rollback)
    skipped_windows: list = field(default_factory=list)  # [first, last] step whose batches a rollback skipped

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        loaded = Counters(**{k: v for k, v in state.items() if k in known})  # older ones also kept elapsed_s
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))


class TrackerRun:
    """The tracker's run id (trainer_state.json "run_id"), so a resumed run appends to the same run."""

    checkpoint_scope: ClassVar[str] = SHARED

    def __init__(self) -> None:
        self.resumed_id: str | None = None  # from the checkpoint, before the tracker exists
        self.tracker: Any = None

    def state_dict(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else self.resumed_id

    def load_state_dict(self, state: str | None) -> None:
        self.resumed_id = state
