"""Fine-tuning in MLflow: a parent run per model and task (mode=finetune: settings, the medians over seeds,
inference time, the report as artifact) and a child run per seed (mode=finetune-seed, tag
mlflow.parentRunId: the seed, the hyperparameters, train loss and dev metrics per epoch with the epoch as
step). The runs go through distil's tracker (pretrain.tracking): nothing here blocks or fails fine-tuning
when the store does not answer; the report keeps every result.

The per-epoch figures come from a transformers TrainerCallback (EpochLog), which also keeps them for the
report when tracking is off; transformers' own MLflow callback is not used, so a fine-tuning run has the
same store, redaction and failure behaviour as a training run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from transformers import TrainerCallback

from distil.pretrain.tracking.tracker import NullTracker

DEFAULT_STORE_RUN_DIR = Path("runs") / "finetune"  # default store: runs/mlflow.db, as train / evaluate / review
TRAINER_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def dev_metric_name(trainer_key: str) -> str | None:
    """Trainer's `eval_dev_accuracy` / `eval_dev_mm_accuracy` -> `dev_accuracy` / `dev_mm_accuracy`; its
    timing figures -> None (not results)."""
    if not trainer_key.startswith("eval_") or trainer_key.endswith(TRAINER_SUFFIXES) or trainer_key == "eval_epoch":
        return None
    return trainer_key[len("eval_"):]


class EpochLog(TrainerCallback):
    """Train loss and dev metrics per epoch: kept in `history` (one dict per epoch), sent to `tracker` with
    the epoch as step, and printed as one line per epoch."""

    def __init__(self, tracker: NullTracker, seed: int, echo: Callable[[str], None] = click.echo) -> None:
        self.tracker = tracker
        self.seed = seed
        self.echo = echo
        self.history: list[dict[str, float]] = []

    def _entry(self, epoch: int) -> dict[str, float]:
        if not self.history or self.history[-1]["epoch"] != epoch:
            self.history.append({"epoch": epoch})
        return self.history[-1]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.epoch is not None:
            epoch = round(state.epoch)
            self._entry(epoch)["train_loss"] = float(logs["loss"])
            self.tracker.log_metrics({"train_loss": float(logs["loss"])}, step=epoch)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        epoch = round(state.epoch or 0)
        found = {name: float(v) for k, v in (metrics or {}).items()
                 if (name := dev_metric_name(k)) is not None and isinstance(v, int | float)}
        if not found:
            return
        self._entry(epoch).update(found)
        self.tracker.log_metrics(found, step=epoch)
        shown = " ".join(f"{k} {v:.4f}" for k, v in self._entry(epoch).items() if k != "epoch")
        self.echo(f"  seed {self.seed} epoch {epoch}: {shown}")

    def final(self) -> dict[str, float]:
        """The last evaluation's dev metrics (the model as training left it)."""
        for entry in reversed(self.history):
            dev = {k: v for k, v in entry.items() if k.startswith("dev")}
            if dev:
                return dev
        return {}


class FinetuneTracking:
    """The parent run (opened first, closed last) and one child run per seed."""

    def __init__(self, enabled: bool, tracking_uri: str | None, experiment: str) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent: NullTracker = NullTracker()
        self.child_ids: dict[int, str | None] = {}

    def _tracker(self, run_name: str) -> NullTracker:
        if not self.enabled:
            return NullTracker()
        from distil.pretrain.tracking.config import command_tracking_config
        from distil.pretrain.tracking.mlflow_tracker import create_tracker

        cfg = command_tracking_config(self.tracking_uri, self.experiment, run_name)
        return create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(DEFAULT_STORE_RUN_DIR))

    def check(self) -> None:
        """A bad --tracking-uri / --experiment fails before any work."""
        if self.enabled:
            from distil.pretrain.tracking.config import command_tracking_config

            command_tracking_config(self.tracking_uri, self.experiment)

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.parent = self._tracker(run_name)
        self.parent.log_params({"mode": "finetune", **params})
        self.parent.set_tags(tags)
        if self.enabled and self.parent.run_id is None and type(self.parent).__name__ != "NullTracker":
            click.echo("MLflow did not answer: this fine-tuning is not tracked (the report has every result)",
                       err=True)

    @property
    def parent_run_id(self) -> str | None:
        return self.parent.run_id

    def start_seed(self, run_name: str, seed: int, params: dict[str, Any], tags: dict[str, str]) -> NullTracker:
        if self.parent.run_id is None:  # no parent to hang it on: the report alone holds the seed
            return NullTracker()
        child = self._tracker(run_name)
        child.set_tags({**tags, "mlflow.parentRunId": self.parent.run_id})
        child.log_params({**params, "mode": "finetune-seed", "finetune.seed": seed})  # the parent's is the first seed
        self.child_ids[seed] = child.run_id
        return child

    def finish_parent(self, metrics: dict[str, float], report: Path | None, status: str = "FINISHED") -> None:
        if metrics:
            self.parent.log_metrics(metrics, step=0)
        if report is not None and report.is_file():
            self.parent.log_artifact(str(report), artifact_path="finetune")
        self.parent.finish(status)
