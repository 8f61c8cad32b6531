"""The tracker interface every rank gets, and NullTracker: the tracker that does nothing (tracking disabled,
or a rank other than 0). MlflowTracker and NodeReporter extend it.

    tracker.log_params(flat: dict[str, str|int|float|bool])
    tracker.log_metrics(metrics: dict[str, float], step: int)
    tracker.log_artifact(path, artifact_path: str | None = None)
    tracker.log_student(export_dir: str)          # exported HF student -> logged + registered model
    tracker.log_inputs(shards, manifest, ...)     # lineage: the shard set (dataset) and teacher (model)
    tracker.ui_link(run=True) -> str | None       # the run's page in the UI's model-training view
    tracker.set_tags(tags: dict[str, str])        # optional extras (mutable, e.g. "preempted")
    tracker.run_id -> str | None                  # kept in checkpoints so a resumed run appends
    tracker.finish(status: "FINISHED" | "FAILED" | "KILLED")

Used as a context manager, a tracker finishes with the status the block ended with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


class NullTracker:
    """Tracking disabled (or a non-zero rank): every call is a no-op."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_student(self, export_dir: str) -> None:
        pass

    def log_inputs(self, shards: str, manifest: Any, split: str = "train", context: str = "training",
                   model: str | None = None, model_role: str = "teacher") -> None:
        pass

    def ui_link(self, run: bool = True) -> str | None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(_status_for_exception(exc_type))


def _status_for_exception(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt | SystemExit):
        return "KILLED"
    return "FAILED"
