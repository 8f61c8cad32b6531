"""Experiment tracking. Only global rank 0 ever holds a real tracker; other ranks get NullTracker.

The trainer talks to this interface only:
    tracker.log_params(flat: dict[str, str|int|float|bool])
    tracker.log_metrics(metrics: dict[str, float], step: int)
    tracker.log_artifact(path, artifact_path: str | None = None)
    tracker.log_student(export_dir: str)          # exported HF student -> logged + registered model
    tracker.run_id -> str | None                  # kept in checkpoints so a resumed run appends
    tracker.finish(status: "FINISHED" | "FAILED" | "KILLED")
"""

from __future__ import annotations

from typing import Any


class NullTracker:
    """Tracking disabled (or a non-zero rank): every call is a no-op."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_student(self, export_dir: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


from dataclasses import dataclass  # noqa: E402


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the local SQLite store
    experiment: str = "distil"
    run_name: str | None = None
    registered_model_name: str | None = "distil-student"


def create_tracker(cfg: TrackingConfig, *, rank: int, local_rank: int, world_size: int, run_dir: str,
                   resume_run_id: str | None = None):
    """Rank 0 gets the MLflow tracker (the MLflow issue fills this in); every other rank a NullTracker."""
    return NullTracker()
