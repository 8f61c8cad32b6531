"""Tracking settings: TrackingConfig (the `tracking:` section of a training config) with its value checks,
where the tracking store is when the config names none, and a run's name when the config gives none."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distil.common.errors import UserError


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/../mlflow.db
    experiment: str = "distil"
    run_name: str | None = None  # None: the run folder's name with the mode (default_run_name)
    registered_model_name: str | None = "distil-student"  # None: log the student without registering it
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # one sample per interval ...
    system_metrics_samples_per_log: int = 1  # ... averaged over this many samples per logged point
    max_buffered_metrics: int = 100_000  # metric points kept while the server is unreachable
    retry_interval_s: float = 10.0  # how often an unreachable server is tried again
    request_timeout_s: int = 20  # per HTTP request to the tracking server
    start_timeout_s: float = 15.0  # create_tracker waits at most this long for the run to be created
    finish_timeout_s: float = 300.0  # finish() waits at most this long for the outbox to drain ...
    finish_offline_wait_s: float = 30.0  # ... but only this long while the server does not answer

    def validate(self) -> None:
        """Value checks for the trainer's config validation; each failure names the key to change."""
        if not self.experiment.strip():
            raise UserError("tracking.experiment must not be empty")
        if self.registered_model_name is not None and not self.registered_model_name.strip():
            raise UserError("tracking.registered_model_name must be a name or null (no registration)")
        if self.tracking_uri is not None and "://" not in self.tracking_uri and not self.tracking_uri.startswith(
                ("file:", "databricks")):
            raise UserError(f"tracking.tracking_uri={self.tracking_uri!r}: give a URI such as "
                            "http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db (or null for the default)")
        for name in ("system_metrics_interval_s", "retry_interval_s", "request_timeout_s", "start_timeout_s",
                     "finish_timeout_s", "finish_offline_wait_s"):
            if getattr(self, name) <= 0:
                raise UserError(f"tracking.{name}={getattr(self, name)} must be > 0")
        for name in ("system_metrics_samples_per_log", "max_buffered_metrics"):
            if getattr(self, name) < 1:
                raise UserError(f"tracking.{name}={getattr(self, name)} must be >= 1")


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """The embedded store: one SQLite file beside the run folders, so runs of one output root share it."""
    root = Path(run_dir).resolve().parent
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | os.PathLike) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


def default_run_name(run_dir: str | os.PathLike, mode: str | None = None) -> str:
    """A run's name when `tracking.run_name` is not set: the run folder's name with the mode, so teacher,
    students and reruns read apart in the UI (runs/teacher in MLM mode: `teacher-mlm`; a folder whose name
    already holds the mode keeps it: `teacher-mlm`).

    distil never leaves the name to MLflow: its generated names (`upset-ape-485`) are drawn from Python's
    global random generator, which training seeds with run.seed, so every run with one seed got the same
    name, and with a local store the draw also moved rank 0's seeded generator.
    """
    name = Path(run_dir).resolve().name or "run"
    if mode and mode not in name.split("-"):
        name = f"{name}-{mode}"
    return name


def command_tracking_config(tracking_uri: str | None, experiment: str, run_name: str | None = None) -> TrackingConfig:
    """The tracker settings of a one-off command's run (`distil evaluate`, `distil finetune`): no system
    metrics, no model registration, short start and finish waits; validated, errors naming the options."""
    cfg = TrackingConfig(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                         registered_model_name=None, system_metrics=False, start_timeout_s=10.0, finish_timeout_s=120.0,
                         finish_offline_wait_s=3.0)
    try:
        cfg.validate()
    except UserError as error:
        raise UserError(str(error).replace("tracking.tracking_uri", "--tracking-uri")
                        .replace("tracking.experiment", "--experiment")) from None
    return cfg
