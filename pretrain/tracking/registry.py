"""The student in MLflow's model registry: log_student_model logs an exported HF student as an MLflow
transformers model of its run and registers it (one version per run); count_parameters sizes it."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from distil.pretrain.tracking.lineage import MODEL_PATH_TAG, model_key

logger = logging.getLogger("distil.tracking")

STUDENT_MODEL_NAME = "student"  # the logged model's name when its run has none


def log_student_model(client: Any, uri: str, run_id: str, export_dir: str,
                      registered_model_name: str | None) -> None:
    """Logs the exported HF student as an MLflow transformers model (fill-mask pipeline) linked to `run_id`,
    and registers it under `registered_model_name`: one version per run (a resumed run that logged its
    student before is not registered twice)."""
    from importlib.metadata import version

    import mlflow
    import mlflow.transformers
    from transformers import pipeline

    client.set_tag(run_id, "distil.num_parameters", str(count_parameters(export_dir)))
    fill_mask = pipeline("fill-mask", model=export_dir, device="cpu")
    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # offline: "model card could not be retrieved from the hub", license notes
    previous_uri = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also exports it to child processes
    # log_model() and, with a local store, the registry's resolution of `models:/<id>` use the process-wide
    # tracking URI (the registry URI follows it unless a user set one): it points at this run's store until
    # the model is registered, then is restored.
    mlflow.set_tracking_uri(uri)
    try:
        # Created here rather than by log_model, which would put it in the process's current experiment
        # (Default) instead of the run's. The tag lets a run that starts from this folder (a student of this
        # teacher, an evaluation) link this model as its input (lineage.py).
        # Named after its run (teacher-mlm, student-distill): the name the UI shows where a run uses it.
        run = client.get_run(run_id)
        name = run.info.run_name or STUDENT_MODEL_NAME
        model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                           params=dict(run.data.params),
                                           tags={MODEL_PATH_TAG: model_key(export_dir)})
        info = mlflow.transformers.log_model(
            fill_mask, name=name, task="fill-mask", run_id=run_id, model_id=model.model_id,
            pip_requirements=[f"torch=={version('torch').split('+')[0]}",
                              f"transformers=={version('transformers')}"],
            await_registration_for=0)
        _register_student(client, run_id, info, registered_model_name)
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
        quiet.setLevel(level)


def _register_student(client: Any, run_id: str, info: Any, registered_model_name: str | None) -> None:
    import mlflow

    client.set_tag(run_id, "distil.student_model_uri", info.model_uri)
    if not registered_model_name:
        return
    existing = client.search_model_versions(f"name='{registered_model_name}' and run_id='{run_id}'")
    if existing:
        logger.info("student of run %s already registered as %s version %s", run_id, registered_model_name,
                    existing[0].version)
        return
    try:
        client.get_registered_model(registered_model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(registered_model_name)
    version_info = client.create_model_version(registered_model_name, source=info.model_uri, run_id=run_id,
                                               model_id=info.model_id)
    client.set_tag(run_id, "distil.registered_model", f"{registered_model_name}/{version_info.version}")


def count_parameters(export_dir: str | os.PathLike) -> int:
    """Parameters of an exported model, read from its safetensors headers (nothing loaded). save_pretrained
    stores tied weights once, so this matches model.num_parameters()."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(export_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return total
