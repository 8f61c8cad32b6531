"""Links into the MLflow UI that open on the model-training view, and what MLflow 3 needs to show it there.

MLflow 3's UI opens an experiment on its GenAI overview ("Traces 0") unless the URL says otherwise: the runs
table, charts and the model registry are behind its "Model training" switch. The UI (checked in the JS of
mlflow 3.x: the workflow-type context reads the `workflowType` search parameter, `genai` or
`machine_learning`, before its stored default) honours `?workflowType=machine_learning` on any experiment or
run URL, so every link distil prints or stores carries it. Experiments distil creates are also tagged
`mlflow.experimentKind=custom_model_development` (MLflow's kind for model training, shown as "Machine
learning"), for clients and UI versions that go by the experiment's kind.

A server URI (http/https) is the UI's address; a local store (sqlite:, file:) has no UI until
`mlflow ui --backend-store-uri <store>` serves it, by default on http://127.0.0.1:5000.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from distil.pretrain.tracking.params import redact_uri

MODEL_TRAINING_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_base(tracking_uri: str) -> str | None:
    """The UI's address for a tracking server URI, without credentials; None for a local store."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def serve_command(tracking_uri: str) -> str | None:
    """The command that serves a local store's UI (None for a server, which is its own UI)."""
    if ui_base(tracking_uri) is not None or tracking_uri.startswith("databricks"):
        return None
    return f"mlflow ui --backend-store-uri {redact_uri(tracking_uri)}"


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The experiment's (or run's) page in the model-training view; for a local store, where `mlflow ui`
    serves it by default (serve_command). None for a Databricks workspace (its own links)."""
    if tracking_uri.startswith("databricks"):
        return None
    base = ui_base(tracking_uri) or LOCAL_UI
    return run_url(base, experiment_id, run_id) if run_id else experiment_url(base, experiment_id)


def describe_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """ui_link for a log line: a local store's link followed by the command that serves it."""
    link = ui_link(tracking_uri, experiment_id, run_id)
    if link is None:
        return f"experiment {experiment_id}" + (f", run {run_id}" if run_id else "")
    command = serve_command(tracking_uri)
    return f"{link} (after: {command})" if command else link
