"""Experiment tracking with MLflow. Only global rank 0 ever talks to MLflow; other ranks get NullTracker.

The trainer talks to the tracker interface only (see tracker.py): log_params, log_metrics, log_artifact,
log_student, set_tags, run_id, finish. Design (see docs/tracking.md):
- transport.py: every call on the training thread only queues a record; one background thread sends it,
  so a dead or unreachable server never blocks or stops training (one warning, bounded buffering, retries).
- system_metrics.py: MLflow's own monitors, one sampler per node; other nodes report through the
  torch.distributed store, so no rank but 0 opens a connection to MLflow and no collective is added.
- mlflow_tracker.py: rank 0's MlflowTracker and create_tracker; registry.py: the student as a registered
  model; params.py: what is sent (flattened, redacted, truncated) and the environment tags; config.py:
  TrackingConfig and run names; lineage.py: the shard set and the teacher as the run's inputs; links.py:
  links that open the UI on its model-training view.

This package re-exports the public names callers import from `distil.pretrain.tracking`.
"""

from distil.pretrain.tracking.config import (
    TrackingConfig,
    default_run_name,
    default_tracking_uri,
    resolve_tracking_uri,
)
from distil.pretrain.tracking.lineage import manifest_digest, shard_set_dataset
from distil.pretrain.tracking.links import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    MODEL_TRAINING_VIEW,
    describe_link,
    experiment_url,
    run_url,
    serve_command,
    ui_base,
    ui_link,
)
from distil.pretrain.tracking.mlflow_tracker import MAX_PARAMS_PER_BATCH, MlflowTracker, create_tracker
from distil.pretrain.tracking.params import (
    INVALID_KEY_CHARS,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    SECRET_KEY_PATTERN,
    URL_CREDENTIALS_PATTERN,
    clean_key,
    clean_metrics,
    clean_params,
    clean_tags,
    clean_value,
    environment_tags,
    flatten,
    redact_uri,
    source_tags,
)
from distil.pretrain.tracking.registry import STUDENT_MODEL_NAME, count_parameters, log_student_model
from distil.pretrain.tracking.system_metrics import STORE_PREFIX, NodeReporter, NodeSampler, read_node_reports
from distil.pretrain.tracking.tracker import RUN_STATUSES, NullTracker
from distil.pretrain.tracking.transport import (
    MAX_METRICS_PER_BATCH,
    PERMANENT_ERROR_CODES,
    configure_http_client,
)

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING_KIND",
    "MODEL_TRAINING_VIEW",
    "INVALID_KEY_CHARS",
    "MAX_KEY_LENGTH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "PERMANENT_ERROR_CODES",
    "RUN_STATUSES",
    "SECRET_KEY_PATTERN",
    "STORE_PREFIX",
    "STUDENT_MODEL_NAME",
    "URL_CREDENTIALS_PATTERN",
    "MlflowTracker",
    "NodeReporter",
    "NodeSampler",
    "NullTracker",
    "TrackingConfig",
    "clean_key",
    "clean_metrics",
    "clean_params",
    "clean_tags",
    "clean_value",
    "configure_http_client",
    "count_parameters",
    "create_tracker",
    "default_run_name",
    "default_tracking_uri",
    "describe_link",
    "environment_tags",
    "experiment_url",
    "flatten",
    "log_student_model",
    "manifest_digest",
    "read_node_reports",
    "redact_uri",
    "resolve_tracking_uri",
    "run_url",
    "serve_command",
    "shard_set_dataset",
    "source_tags",
    "ui_base",
    "ui_link",
]
