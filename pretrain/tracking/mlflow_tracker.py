"""Global rank 0's tracker (MlflowTracker) and create_tracker, which hands every rank its tracker: rank 0 the
MLflow one, local rank 0 of another node a NodeReporter, every other rank a NullTracker. Only global rank 0
ever talks to MLflow.

MlflowTracker's public methods run on the training thread and only queue records (transport.Sender sends
them); _RunWriter holds what the sender thread does with each record against the MLflow client.

Every run has a name distil chose (tracking.run_name, else the caller's default such as `teacher-mlm`, else
the run folder's name): MLflow never draws one from Python's seeded global random generator. The run's
source (`distil train`, `distil evaluate`) and user are tagged as MLflow's own runs are; experiments distil
creates are tagged as model training; the run's link, in the UI's model-training view, is logged when the run
is created and when it ends (links.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distil.pretrain.tracking.config import TrackingConfig, default_run_name, resolve_tracking_uri
from distil.pretrain.tracking.lineage import (
    DATASET_CONTEXT_TAG,
    external_model,
    find_model,
    model_key,
    shard_set_dataset,
)
from distil.pretrain.tracking.links import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, describe_link, ui_link
from distil.pretrain.tracking.params import (
    MAX_KEY_LENGTH,
    clean_metrics,
    clean_params,
    clean_tags,
    environment_tags,
    redact_uri,
    source_tags,
)
from distil.pretrain.tracking.registry import log_student_model
from distil.pretrain.tracking.system_metrics import NodeReporter, SystemMetricsLogger
from distil.pretrain.tracking.tracker import RUN_STATUSES, NullTracker
from distil.pretrain.tracking.transport import (
    Sender,
    WarnOnce,
    configure_http_client,
    never_raises,
    refused_credentials,
)

logger = logging.getLogger("distil.tracking")

MAX_PARAMS_PER_BATCH = 100


def create_tracker(cfg: TrackingConfig, *, rank: int, local_rank: int, world_size: int, run_dir: str,
                   resume_run_id: str | None = None, num_nodes: int | None = None,
                   store: Any | None = None, run_name: str | None = None,
                   source: str = "distil") -> NullTracker:
    """Rank 0 gets the MLflow tracker; every other rank a NullTracker that never connects to MLflow.

    The run is called cfg.run_name, else `run_name` (the caller's default, e.g. default_run_name(run_dir,
    mode)), else the run folder's name; a resumed run keeps the name it has. `source` is the command that
    makes the run (tag mlflow.source.name: the UI's Source column).

    On a multi-node run, local rank 0 of a node other than rank 0's gets a NodeReporter: a NullTracker that
    also samples its node's system metrics into the torch.distributed store (`store`, default: the default
    process group's store once it exists) for rank 0 to log.
    """
    if not cfg.enabled:
        return NullTracker()
    nodes = num_nodes or _infer_num_nodes(world_size)
    if rank != 0:
        if local_rank == 0 and cfg.system_metrics and (nodes > 1 or store is not None):
            return NodeReporter(cfg, store=store)
        return NullTracker()
    uri = resolve_tracking_uri(cfg, run_dir)
    try:
        return MlflowTracker(cfg, uri=uri, world_size=world_size, num_nodes=nodes, run_dir=run_dir,
                             resume_run_id=resume_run_id, store=store, run_name=run_name, source=source)
    except Exception as error:  # noqa: BLE001 - tracking never stops training
        refused = refused_credentials(uri, error)
        if refused is not None:
            logger.error(refused)
        else:
            logger.warning("MLflow tracking disabled for this run: %r", error)
        return NullTracker()


def _infer_num_nodes(world_size: int) -> int:
    """From the launcher's contract: DeepSpeed exports CROSS_SIZE (nodes) and LOCAL_SIZE, torchrun
    LOCAL_WORLD_SIZE (processes per node), SLURM SLURM_JOB_NUM_NODES."""
    for name in ("CROSS_SIZE", "SLURM_JOB_NUM_NODES"):
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 0:
            return max(1, math.ceil(world_size / int(value)))
    return 1


class MlflowTracker(NullTracker):
    """Global rank 0's tracker. All public methods return at once; the sender thread does the I/O."""

    def __init__(self, cfg: TrackingConfig, *, uri: str, world_size: int, num_nodes: int, run_dir: str,
                 resume_run_id: str | None = None, store: Any | None = None, run_name: str | None = None,
                 source: str = "distil") -> None:
        configure_http_client(cfg.request_timeout_s)
        import mlflow

        self.cfg = cfg
        self.uri = uri
        self.run_dir = Path(run_dir)
        self.num_nodes = num_nodes
        self.warn_once = WarnOnce()  # never_raises: one warning per failing method
        self._finished = False
        self._system = SystemMetricsLogger(cfg, num_nodes=num_nodes, store=store,
                                           log_points=self._queue_metrics, set_tags=self.set_tags)
        self._writer = _RunWriter(mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), cfg, uri=uri,
                                  run_dir=self.run_dir, resume_run_id=resume_run_id, system=self._system,
                                  run_name=cfg.run_name or run_name or default_run_name(run_dir))
        self._sender = Sender(cfg, uri=uri, apply=self._writer.apply)
        self._sender.start(("start", {**environment_tags(world_size, num_nodes), **source_tags(source)}))
        if cfg.system_metrics:
            self._system.start()
        atexit.register(self._finish_at_exit)

    # -- public API (training thread) ------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """None only while the server has been unreachable since the start (the run does not exist yet)."""
        return self._writer.run_id or self._writer.resume_run_id

    @property
    def offline(self) -> bool:
        return self._sender.offline

    @property
    def run_name(self) -> str:
        """The name given at start, or the resumed run's own name once it was read."""
        return self._writer.run_name

    def ui_link(self, run: bool = True) -> str | None:
        """The run's (or with run=False its experiment's) page in the UI's model-training view (for a local
        store, where `mlflow ui` serves it: links.serve_command). None until the run exists."""
        if self._writer.experiment_id is None or self.run_id is None:
            return None
        return ui_link(self.uri, self._writer.experiment_id, self.run_id if run else None)

    @never_raises
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._sender.put_op(("params", clean_params(params)))

    @never_raises
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._sender.put_op(("tags", clean_tags(tags)))

    @never_raises
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, v, now, int(step)) for k, v in clean_metrics(metrics).items()]
        self._queue_metrics(points)

    @never_raises
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            logger.warning("not logging artifact %s: no such file or folder", path)
            return
        self._sender.put_op(("artifact", str(path), artifact_path))

    @never_raises
    def log_dict(self, values: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON/YAML artifact from a dict (written now, sent later)."""
        target = self.run_dir / "tracking_artifacts" / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values, indent=2, default=str))
        self._sender.put_op(("artifact", str(target),
                             str(Path(artifact_file).parent) if "/" in artifact_file else None))

    @never_raises
    def log_inputs(self, shards: str, manifest: Any, split: str = "train", context: str = "training",
                   model: str | None = None, model_role: str = "teacher") -> None:
        """Lineage: the shard set's `split` as a dataset input of the run (lineage.shard_set_dataset), and the
        model the run starts from (a teacher folder or hub id, an evaluated model) as a model input."""
        dataset = shard_set_dataset(shards, manifest, split)
        self._sender.put_op(("inputs", dataset, context, model_key(model) if model else None, model_role))

    @never_raises
    def log_student(self, export_dir: str) -> None:
        self._sender.put_op(("student", str(export_dir)))

    @never_raises
    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run with `status`; waits at most finish_timeout_s for unsent records."""
        if self._finished:
            return
        self._finished = True
        status = status if status in RUN_STATUSES else "FAILED"
        self._system.stop()
        self._sender.stop(("loss_curves",), ("end", status))
        self._sender.wait_until_drained()
        self._sender.warn_unsent()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Waits until everything queued so far is sent (tests, evaluation scripts). True if drained."""
        return self._sender.flush(timeout_s)

    # -- internals ---------------------------------------------------------------------------------------

    def _queue_metrics(self, points: list) -> None:
        if points:
            self._sender.put_metrics(points)

    def _finish_at_exit(self) -> None:
        """A process that exits without finish(): the run did not end as planned."""
        if not self._finished:
            self.cfg.finish_timeout_s = min(self.cfg.finish_timeout_s, self.cfg.finish_offline_wait_s)
            self.finish("FAILED")


class _RunWriter:
    """What the sender thread does with each queued operation `(kind, *args)`: `do_<kind>(*args)` against the
    MLflow client. "start" creates the run (or resumes the checkpoint's run); the others write to it."""

    def __init__(self, client: Any, cfg: TrackingConfig, *, uri: str, run_dir: Path,
                 resume_run_id: str | None, system: SystemMetricsLogger, run_name: str) -> None:
        self.client = client
        self.cfg = cfg
        self.uri = uri
        self.run_dir = run_dir
        self.resume_run_id = resume_run_id
        self.run_name = run_name
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._system = system  # a resumed run's system metrics continue after its last step
        # A resumed run's last logged training step: the steps up to it are trained again after a crash (from the
        # checkpoint before it) and, the resume being exact, give the same values, which the run already holds.
        self.logged_through: int | None = None

    def apply(self, op: tuple) -> None:
        getattr(self, "do_" + op[0])(*op[1:])

    def do_start(self, tags: dict[str, str]) -> None:
        experiment_id = self._experiment_id()
        run_id = None
        if self.resume_run_id:
            run_id = self._resume(self.resume_run_id)
            if run_id is None:
                tags = {**tags, "distil.resumed_from": self.resume_run_id}
        if run_id is None:
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            run_id = run.info.run_id
        else:
            self._log_tags(run_id, tags)
        self.experiment_id = self.experiment_id or experiment_id  # a resumed run stays in its experiment
        self.run_id = run_id
        logger.info("MLflow run %s: %s", self.run_name, describe_link(self.uri, self.experiment_id, run_id))

    def _experiment_id(self) -> str:
        """The experiment's id; one distil creates is tagged as model training (links.py)."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.cfg.experiment, artifact_location=self._artifact_root(),
                                                 tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException as error:  # another run created it meanwhile
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            if error.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                raise
            return experiment.experiment_id

    def _resume(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run", run_id,
                           redact_uri(self.uri))
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.run_name = run.info.run_name or self.run_name  # a resumed run keeps its name
        self.experiment_id = run.info.experiment_id
        steps = [m.step for m in run.data._metric_objs if m.key.startswith("system/")]
        self._system.step = max(steps) + 1 if steps else 0
        trained = [m.step for m in run.data._metric_objs if not m.key.startswith("system/")]
        self.logged_through = max(trained) if trained else None
        self.client.set_tag(run_id, "distil.resumed", "true")
        return run_id

    def _artifact_root(self) -> str | None:
        """A local store keeps artifacts beside its database (MLflow's default would be ./mlruns of the CWD)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None

    def do_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
        if changed:
            # params are immutable in MLflow: values that changed on resume go to tags
            self._log_tags(self.run_id, {f"distil.resume_param.{k}"[:MAX_KEY_LENGTH]: v for k, v in changed.items()})

    def do_tags(self, tags: dict[str, str]) -> None:
        self._log_tags(self.run_id, tags)

    def _log_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i:i + MAX_PARAMS_PER_BATCH])

    def do_metrics(self, points: list) -> None:
        if self.logged_through is not None:  # MLflow's history is append-only: never log a step twice
            points = [p for p in points if p.key.startswith("system/") or p.step > self.logged_through]
            if not points:
                return
        self.client.log_batch(self.run_id, metrics=points)

    def do_artifact(self, path: str, artifact_path: str | None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, path, artifact_path)
        elif Path(path).exists():
            self.client.log_artifact(self.run_id, path, artifact_path)
        else:
            logger.warning("artifact %s disappeared before it could be sent to MLflow", path)

    def do_inputs(self, dataset: dict[str, str], context: str, model: str | None, role: str) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

        self.client.log_inputs(self.run_id, datasets=[
            DatasetInput(Dataset(**dataset), tags=[InputTag(DATASET_CONTEXT_TAG, context)])])
        if model:
            model_id = find_model(self.client, model) or external_model(self.client, self.experiment_id, model, role)
            self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])

    def do_student(self, export_dir: str) -> None:
        log_student_model(self.client, self.uri, self.run_id, export_dir, self.cfg.registered_model_name)

    def do_loss_curves(self) -> None:
        """The run folder's metrics.jsonl as a PNG under the run's plots/ artifacts."""
        try:
            from distil.pretrain.metrics.plots import write_loss_curves

            png = write_loss_curves(self.run_dir)
        except Exception as error:  # noqa: BLE001 - a plot is never worth a failed run
            logger.warning("could not draw the loss curves of %s: %s", self.run_dir, error)
            return
        if png is not None:
            self.client.log_artifact(self.run_id, str(png), "plots")

    def do_end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
        logger.info("MLflow run %s ended %s: %s", self.run_name, status,
                    describe_link(self.uri, self.experiment_id, self.run_id))
