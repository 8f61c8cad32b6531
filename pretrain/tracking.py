"""Experiment tracking with MLflow. Only global rank 0 ever talks to MLflow; other ranks get NullTracker.

The trainer talks to this interface only:
    tracker.log_params(flat: dict[str, str|int|float|bool])
    tracker.log_metrics(metrics: dict[str, float], step: int)
    tracker.log_artifact(path, artifact_path: str | None = None)
    tracker.log_student(export_dir: str)          # exported HF student -> logged + registered model
    tracker.set_tags(tags: dict[str, str])        # optional extras (mutable, e.g. "preempted")
    tracker.run_id -> str | None                  # kept in checkpoints so a resumed run appends
    tracker.finish(status: "FINISHED" | "FAILED" | "KILLED")

Design (see docs/tracking.md):
- Every call on the training thread only puts a record into an in-memory outbox and returns; one background
  thread sends it. A dead or unreachable server therefore never blocks or stops training: the sender logs ONE
  warning, keeps the metrics (bounded: the oldest are dropped past `max_buffered_metrics`), retries every
  `retry_interval_s`, and flushes everything once the server answers again.
- MLflow's HTTP client retries for minutes by default; we default its retries to 0 and its timeout to
  `request_timeout_s` (only where the user did not set MLFLOW_HTTP_REQUEST_* themselves): our sender does the
  retrying.
- System metrics come from MLflow's own monitors (CPU, memory, disk, network, NVIDIA/AMD GPU), one node id per
  node: `system/node_<i>/...`. Rank 0 samples node 0. On a multi-node run, local rank 0 of every other node
  samples its node and posts the aggregate into the torch.distributed key-value store (the TCPStore the job
  already uses, served by rank 0): rank 0 reads it from there and logs it. So no rank but 0 ever opens a
  connection to MLflow, and no collective is added to the training loop.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("distil.tracking")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
STUDENT_MODEL_NAME = "student"
# MLflow's limits (mlflow.utils.validation); imported lazily there, restated here so NullTracker ranks never
# import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
SECRET_KEY_PATTERN = re.compile(r"(token|secret|passw|api[_-]?key|credential|auth|private[_-]?key)", re.I)
URL_CREDENTIALS_PATTERN = re.compile(r"(?<=://)[^/@\s]+:[^/@\s]+@")
INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
STORE_PREFIX = "distil/system_metrics/"


# ----------------------------------------------------------------------------------------------------------
# config and factory


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/../mlflow.db
    experiment: str = "distil"
    run_name: str | None = None
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
        from distil.common.errors import UserError

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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(_status_for_exception(exc_type))


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """The embedded store: one SQLite file beside the run folders, so runs of one output root share it."""
    root = Path(run_dir).resolve().parent
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | os.PathLike) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


def create_tracker(cfg: TrackingConfig, *, rank: int, local_rank: int, world_size: int, run_dir: str,
                   resume_run_id: str | None = None, num_nodes: int | None = None,
                   store: Any | None = None) -> NullTracker:
    """Rank 0 gets the MLflow tracker; every other rank a NullTracker that never connects to MLflow.

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
    try:
        return MlflowTracker(cfg, uri=resolve_tracking_uri(cfg, run_dir), world_size=world_size,
                             num_nodes=nodes, run_dir=run_dir, resume_run_id=resume_run_id, store=store)
    except Exception as error:  # noqa: BLE001 - tracking never stops training
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


def _status_for_exception(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt | SystemExit):
        return "KILLED"
    return "FAILED"


# ----------------------------------------------------------------------------------------------------------
# what we send: flattening, redaction, truncation


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys; lists and tuples stay one value."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def clean_key(key: str) -> str:
    return INVALID_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]


def clean_value(key: str, value: Any, limit: int) -> str:
    """A value as MLflow stores it: str, secrets redacted, URL credentials stripped, truncated to `limit`."""
    if SECRET_KEY_PATTERN.search(key) and value not in (None, "", False):
        return "***"
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    text = URL_CREDENTIALS_PATTERN.sub("***@", text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {clean_key(k): clean_value(k, v, MAX_PARAM_VALUE_LENGTH) for k, v in flatten(params).items()}


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only (tensors with .item() included); anything else is dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool | int | float):
            out[clean_key(key)] = float(value)
    return out


# ----------------------------------------------------------------------------------------------------------
# tags: where the run ran


def environment_tags(world_size: int, num_nodes: int) -> dict[str, str]:
    """Git commit, world size, node count, GPU type and library versions. No environment values."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"distil.world_size": str(world_size), "distil.num_nodes": str(num_nodes),
            "distil.gpu_type": _gpu_type(), "distil.hostname": socket.gethostname()}
    for package in ("torch", "deepspeed", "transformers", "triton", "mlflow"):
        try:
            tags[f"distil.version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"distil.version.{package}"] = "not installed"
    commit, dirty = _git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["distil.git_commit"] = commit
        tags["distil.git_dirty"] = str(dirty).lower()
    return tags


def _gpu_type() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}/node"
    except Exception:  # noqa: BLE001 - a tag is never worth a crash
        pass
    return "cpu"


def _git_state() -> tuple[str | None, bool]:
    """The commit of the checkout this package runs from (None outside git)."""
    source_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, bool(status)


# ----------------------------------------------------------------------------------------------------------
# system metrics: MLflow's monitors, one sampler per node


class NodeSampler:
    """Samples this machine with MLflow's own system-metrics monitors (the ones mlflow.start_run uses)."""

    def __init__(self) -> None:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        gpu = self._gpu_monitor()
        if gpu is not None:
            self.monitors.append(gpu)

    @staticmethod
    def _gpu_monitor():
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

        for monitor_class in (GPUMonitor, ROCMMonitor):
            try:
                return monitor_class()
            except Exception:  # noqa: BLE001 - no such GPU / library on this node
                continue
        return None

    def sample(self) -> None:
        for monitor in self.monitors:
            monitor.collect_metrics()

    def aggregate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {k: float(v) for k, v in metrics.items()}


class _PeriodicThread(threading.Thread):
    """Calls `tick()` every `interval_s` until stopped; exceptions are logged at debug level, never raised."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self.tick = tick
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001
                logger.debug("%s tick failed", self.name, exc_info=True)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout)


def _default_store():
    """The default process group's key-value store, or None before init_process_group / after destroy."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        pass
    return None


class NodeReporter(NullTracker):
    """Local rank 0 of a node other than rank 0's: posts this node's system metrics into the torch.distributed
    store for rank 0 to log. It never imports an MLflow client nor opens a connection to the tracking server.

    Protocol: `<prefix>count` counts the reporting nodes (store.add); node i (1-based) sets `<prefix>node_<i>`
    to JSON {"host": ..., "seq": n, "metrics": {...}} after each aggregation.
    """

    def __init__(self, cfg: TrackingConfig, store: Any | None = None) -> None:
        self._store = store
        self._node_index: int | None = None
        self._sampler = NodeSampler()
        self._samples = 0
        self._seq = 0
        self._per_log = max(1, cfg.system_metrics_samples_per_log)
        self._thread = _PeriodicThread("distil-node-reporter", cfg.system_metrics_interval_s, self._tick)
        self._thread.start()

    def _tick(self) -> None:
        self._sampler.sample()
        self._samples += 1
        if self._samples % self._per_log:
            return
        metrics = self._sampler.aggregate()
        store = self._store or _default_store()
        if store is None:
            return
        if self._node_index is None:
            self._node_index = int(store.add(STORE_PREFIX + "count", 1))
        self._seq += 1
        payload = {"host": socket.gethostname(), "seq": self._seq, "metrics": metrics}
        store.set(f"{STORE_PREFIX}node_{self._node_index}", json.dumps(payload))

    def finish(self, status: str = "FINISHED") -> None:
        self._thread.stop()


def read_node_reports(store: Any, last_seq: dict[int, int]) -> list[tuple[int, str, dict[str, float]]]:
    """New reports in the store since `last_seq` (updated in place): [(node index, host, metrics)]."""
    count = int(store.add(STORE_PREFIX + "count", 0))
    reports = []
    for index in range(1, count + 1):
        key = f"{STORE_PREFIX}node_{index}"
        if not store.check([key]):
            continue
        payload = json.loads(store.get(key))
        if payload["seq"] != last_seq.get(index):
            last_seq[index] = payload["seq"]
            reports.append((index, payload["host"], payload["metrics"]))
    return reports


# ----------------------------------------------------------------------------------------------------------
# the outbox: everything goes to MLflow through one background sender


class _Unreachable(Exception):
    """The tracking server did not answer (connection refused, timeout, 5xx): retry later."""


PERMANENT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                         "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
                         "RESOURCE_LIMIT_EXCEEDED", "FEATURE_DISABLED", "NOT_FOUND"}


def _is_permanent(error: Exception) -> bool:
    """A request the server answered and refused: resending it cannot help."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in PERMANENT_ERROR_CODES


@dataclass
class _Outbox:
    """Thread-safe queues: ordered operations, and metric points bounded to `max_metrics` (oldest dropped)."""

    max_metrics: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: collections.deque = field(default_factory=collections.deque)
    metrics: collections.deque = field(default_factory=collections.deque)
    dropped_metrics: int = 0

    def put_op(self, op: tuple) -> None:
        with self.lock:
            self.ops.append(op)

    def put_metrics(self, points: list) -> None:
        with self.lock:
            self.metrics.extend(points)
            self._trim()

    def take_metrics(self, n: int) -> list:
        with self.lock:
            return [self.metrics.popleft() for _ in range(min(n, len(self.metrics)))]

    def return_metrics(self, points: list) -> None:
        with self.lock:
            self.metrics.extendleft(reversed(points))
            self._trim()

    def _trim(self) -> None:
        while len(self.metrics) > self.max_metrics:
            self.metrics.popleft()
            self.dropped_metrics += 1

    def pending(self) -> tuple[int, int]:
        with self.lock:
            return len(self.ops), len(self.metrics)


def _configure_http_client(timeout_s: int) -> None:
    """MLflow's REST client retries with exponential backoff for minutes by default; we retry ourselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    # The telemetry client would try to reach the internet from training nodes that often cannot.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _never_raises(method: Callable) -> Callable:
    """Tracking never stops training: a failing tracker call is logged (once per method) and ignored."""
    import functools

    @functools.wraps(method)
    def guarded(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if method.__name__ not in self._warned_permanent:
                self._warned_permanent.add(method.__name__)
                logger.warning("tracking: %s failed and is skipped: %r", method.__name__, error)
            return None

    return guarded


class MlflowTracker(NullTracker):
    """Global rank 0's tracker. All public methods return at once; the sender thread does the I/O."""

    def __init__(self, cfg: TrackingConfig, *, uri: str, world_size: int, num_nodes: int, run_dir: str,
                 resume_run_id: str | None = None, store: Any | None = None) -> None:
        _configure_http_client(cfg.request_timeout_s)
        import mlflow

        self.cfg = cfg
        self.uri = uri
        self.run_dir = Path(run_dir)
        self.num_nodes = num_nodes
        self._resume_run_id = resume_run_id
        self._run_id: str | None = None
        self._store = store
        self._outbox = _Outbox(max_metrics=cfg.max_buffered_metrics)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._started = threading.Event()  # the first attempt to create/resume the run is over
        self._offline = False
        self._warned_offline = False
        self._warned_permanent: set[str] = set()
        self._system_step = 0
        self._finished = False
        self._disabled = False
        self._next_try = 0.0
        self._node_seq: dict[int, int] = {}
        self._known_nodes: set[int] = set()

        self._client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

        self._outbox.put_op(("start", environment_tags(world_size, num_nodes)))
        self._wake.set()
        self._sender = threading.Thread(target=self._send_loop, name="distil-mlflow-sender", daemon=True)
        self._sender.start()
        self._started.wait(cfg.start_timeout_s)
        self._sampler_thread: _PeriodicThread | None = None
        if cfg.system_metrics:
            self._start_system_metrics()
        atexit.register(self._finish_at_exit)

    # -- public API (training thread) ------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """None only while the server has been unreachable since the start (the run does not exist yet)."""
        return self._run_id or self._resume_run_id

    @property
    def offline(self) -> bool:
        return self._offline

    @_never_raises
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._put(("params", clean_params(params)))

    @_never_raises
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        cleaned = {clean_key(k): clean_value(k, v, MAX_TAG_VALUE_LENGTH) for k, v in flatten(tags).items()}
        self._put(("tags", cleaned))

    @_never_raises
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, v, now, int(step)) for k, v in clean_metrics(metrics).items()]
        if points:
            self._outbox.put_metrics(points)
            self._wake.set()

    @_never_raises
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            logger.warning("not logging artifact %s: no such file or folder", path)
            return
        self._put(("artifact", str(path), artifact_path))

    @_never_raises
    def log_dict(self, values: Mapping[str, Any], artifact_file: str) -> None:
        """A JSON/YAML artifact from a dict (written now, sent later)."""
        target = self.run_dir / "tracking_artifacts" / artifact_file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values, indent=2, default=str))
        self._put(("artifact", str(target), str(Path(artifact_file).parent) if "/" in artifact_file else None))

    @_never_raises
    def log_student(self, export_dir: str) -> None:
        self._put(("student", str(export_dir)))

    @_never_raises
    def finish(self, status: str = "FINISHED") -> None:
        """Ends the run with `status`; waits at most finish_timeout_s for unsent records."""
        if self._finished:
            return
        self._finished = True
        status = status if status in RUN_STATUSES else "FAILED"
        if self._sampler_thread is not None:
            self._sampler_thread.stop()
            self._system_tick(final=True)
        self._outbox.put_op(("loss_curves",))
        self._outbox.put_op(("end", status))
        self._stopping.set()
        self._wake.set()
        self._wait_for_sender()
        ops, metrics = self._outbox.pending()
        if ops or metrics:
            logger.warning("MLflow: %d metric points and %d other records could not be sent to %s before "
                           "the run ended (the metrics are also in the run folder's metrics.jsonl)",
                           metrics, ops, self._safe_uri())
        if self._outbox.dropped_metrics:
            logger.warning("MLflow: %d metric points were dropped while the server was unreachable "
                           "(buffer limit max_buffered_metrics=%d)", self._outbox.dropped_metrics,
                           self.cfg.max_buffered_metrics)

    def _wait_for_sender(self) -> None:
        """Until the outbox is drained: up to finish_timeout_s while sending works (a model upload takes a
        while), up to finish_offline_wait_s once the server stops answering (a preempted job has a grace
        period; metrics.jsonl holds every step anyway)."""
        start = time.monotonic()
        while self._sender.is_alive():
            waited = time.monotonic() - start
            if waited >= self.cfg.finish_timeout_s or (self._offline and waited >= self.cfg.finish_offline_wait_s):
                return
            self._sender.join(0.2)

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Waits until everything queued so far is sent (tests, evaluation scripts). True if drained."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._outbox.pending() == (0, 0) and not self._busy:
                return True
            self._wake.set()
            time.sleep(0.05)
        return False

    # -- internals ---------------------------------------------------------------------------------------

    _busy = False

    def _put(self, op: tuple) -> None:
        self._outbox.put_op(op)
        self._wake.set()

    def _safe_uri(self) -> str:
        return URL_CREDENTIALS_PATTERN.sub("***@", self.uri)

    def _finish_at_exit(self) -> None:
        """A process that exits without finish(): the run did not end as planned."""
        if not self._finished:
            self.cfg.finish_timeout_s = min(self.cfg.finish_timeout_s, self.cfg.finish_offline_wait_s)
            self.finish("FAILED")

    def _send_loop(self) -> None:
        while True:
            if self._offline:  # new records do not hammer a dead server: it is tried once per interval
                time.sleep(max(0.0, self._next_try - time.monotonic()))
            else:
                self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._busy = True
                self._drain()
                if self._offline:
                    self._offline = False
                    logger.info("MLflow tracking server %s reachable again; buffered records sent",
                                self._safe_uri())
            except _Unreachable as error:
                if not self._offline:
                    self._offline = True
                    if not self._warned_offline:
                        self._warned_offline = True
                        logger.warning(
                            "MLflow tracking server %s is unreachable (%s); training goes on, metrics are "
                            "buffered (up to %d points) and sent when it answers again (retry every %.0fs)",
                            self._safe_uri(), str(error.__cause__ or error)[:200],
                            self.cfg.max_buffered_metrics, self.cfg.retry_interval_s)
                self._next_try = time.monotonic() + self.cfg.retry_interval_s
                self._started.set()  # create_tracker stops waiting: training starts offline
            finally:
                self._busy = False
            if self._stopping.is_set() and self._outbox.pending() == (0, 0):
                return

    def _drain(self) -> None:
        """Sends all queued operations in order, then all queued metrics; raises _Unreachable on an outage."""
        while True:
            with self._outbox.lock:
                op = self._outbox.ops[0] if self._outbox.ops else None
            if op is None:
                break
            if self._disabled:
                with self._outbox.lock:
                    self._outbox.ops.clear()
                    self._outbox.metrics.clear()
                return
            self._call(op)
            with self._outbox.lock:
                self._outbox.ops.popleft()
            if op[0] == "start":
                self._started.set()
        while True:
            batch = self._outbox.take_metrics(MAX_METRICS_PER_BATCH)
            if not batch or self._disabled:
                return
            try:
                self._call(("metrics", batch))
            except _Unreachable:
                self._outbox.return_metrics(batch)
                raise

    def _call(self, op: tuple) -> None:
        """One operation against MLflow. Outage -> _Unreachable; a refused request is logged once and dropped."""
        try:
            getattr(self, "_do_" + op[0])(*op[1:])
        except _Unreachable:
            raise
        except Exception as error:  # noqa: BLE001 - tracking never stops training
            if _is_permanent(error):
                if op[0] == "start":
                    self._disabled = True  # e.g. a deleted experiment of that name: nothing can be logged
                    logger.warning("MLflow tracking disabled for this run: %s", str(error)[:300])
                    return
                if op[0] not in self._warned_permanent:
                    self._warned_permanent.add(op[0])
                    logger.warning("MLflow refused %s: %s", op[0], str(error)[:300])
                return
            raise _Unreachable(str(error)[:300]) from error

    # one method per operation kind (run on the sender thread)

    def _do_start(self, tags: dict[str, str]) -> None:
        client = self._client
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(self.cfg.experiment, artifact_location=self._artifact_root())
        else:
            experiment_id = experiment.experiment_id
        run_id = None
        if self._resume_run_id:
            run_id = self._resume(self._resume_run_id)
            if run_id is None:
                tags = {**tags, "distil.resumed_from": self._resume_run_id}
        if run_id is None:
            run = client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags)
            run_id = run.info.run_id
        else:
            self._log_tags(run_id, tags)
        self._run_id = run_id

    def _resume(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run", run_id,
                           self._safe_uri())
            return None
        self._client.update_run(run_id, status="RUNNING")
        steps = [m.step for m in run.data._metric_objs if m.key.startswith("system/")]
        self._system_step = max(steps) + 1 if steps else 0
        self._client.set_tag(run_id, "distil.resumed", "true")
        return run_id

    def _artifact_root(self) -> str | None:
        """A local store keeps artifacts beside its database (MLflow's default would be ./mlruns of the CWD)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None

    def _do_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self._run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
        if changed:
            # params are immutable in MLflow: values that changed on resume go to tags
            self._log_tags(self._run_id, {f"distil.resume_param.{k}"[:MAX_KEY_LENGTH]: v for k, v in changed.items()})

    def _do_tags(self, tags: dict[str, str]) -> None:
        self._log_tags(self._run_id, tags)

    def _log_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i:i + MAX_PARAMS_PER_BATCH])

    def _do_metrics(self, points: list) -> None:
        self._client.log_batch(self._run_id, metrics=points)

    def _do_artifact(self, path: str, artifact_path: str | None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self._run_id, path, artifact_path)
        elif Path(path).exists():
            self._client.log_artifact(self._run_id, path, artifact_path)
        else:
            logger.warning("artifact %s disappeared before it could be sent to MLflow", path)

    def _do_student(self, export_dir: str) -> None:
        log_student_model(self._client, self.uri, self._run_id, export_dir, self.cfg.registered_model_name)

    def _do_loss_curves(self) -> None:
        """The run folder's metrics.jsonl as a PNG under the run's plots/ artifacts."""
        try:
            from distil.pretrain.plots import write_loss_curves

            png = write_loss_curves(self.run_dir)
        except Exception as error:  # noqa: BLE001 - a plot is never worth a failed run
            logger.warning("could not draw the loss curves of %s: %s", self.run_dir, error)
            return
        if png is not None:
            self._client.log_artifact(self._run_id, str(png), "plots")

    def _do_end(self, status: str) -> None:
        self._client.set_terminated(self._run_id, status=status)

    # -- system metrics ----------------------------------------------------------------------------------

    def _start_system_metrics(self) -> None:
        self._sampler = NodeSampler()
        self._samples = 0
        self._sampler_thread = _PeriodicThread("distil-system-metrics", self.cfg.system_metrics_interval_s,
                                               self._system_tick)
        self._sampler_thread.start()

    def _system_tick(self, final: bool = False) -> None:
        """One sample; every samples_per_log samples (and at the end) one logged point per node."""
        self._sampler.sample()
        self._samples += 1
        if final or self._samples % max(1, self.cfg.system_metrics_samples_per_log) == 0:
            self._emit_system_metrics()

    def _emit_system_metrics(self) -> None:
        """Logs node 0's aggregate (if any samples) and any new reports other nodes put in the store."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = self._system_step
        points = []
        if self._samples:
            self._samples = 0
            points += [Metric(f"system/node_0/{k}", v, now, step) for k, v in self._sampler.aggregate().items()]
        store = self._store or _default_store()
        if store is not None and (self.num_nodes > 1 or self._store is not None):
            try:
                for index, host, metrics in read_node_reports(store, self._node_seq):
                    if index not in self._known_nodes:
                        self._known_nodes.add(index)
                        self.set_tags({f"distil.node.node_{index}.hostname": host})
                    points += [Metric(f"system/node_{index}/{k}", v, now, step) for k, v in metrics.items()]
            except Exception:  # noqa: BLE001 - the store is gone at shutdown
                logger.debug("reading node reports failed", exc_info=True)
        if points:
            self._system_step += 1
            self._outbox.put_metrics(points)
            self._wake.set()


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
    # log_model() and, with a local store, the registry's resolution of `models:/<id>` use the process-wide
    # tracking URI (the registry URI follows it unless a user set one): it points at this run's store until
    # the model is registered, then is restored.
    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.transformers.log_model(
            fill_mask, name=STUDENT_MODEL_NAME, task="fill-mask", run_id=run_id,
            pip_requirements=[f"torch=={version('torch').split('+')[0]}",
                              f"transformers=={version('transformers')}"],
            await_registration_for=0)
        _register_student(client, run_id, info, registered_model_name)
    finally:
        mlflow.set_tracking_uri(previous_uri)
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
