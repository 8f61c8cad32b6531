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

Import each name from the module that defines it.
"""
