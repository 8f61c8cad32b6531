"""Getting records to MLflow without ever blocking or stopping training.

Every tracker call on the training thread only puts a record into an in-memory Outbox and returns; one
background Sender thread sends it. A dead or unreachable server therefore never blocks or stops training:
the sender logs ONE warning, keeps the metrics (bounded: the oldest are dropped past `max_buffered_metrics`),
retries every `retry_interval_s`, and flushes everything once the server answers again. A request the server
answers and refuses (is_permanent) is logged once and dropped.

MLflow's HTTP client retries for minutes by default; configure_http_client defaults its retries to 0 and its
timeout to `request_timeout_s` (only where the user did not set MLFLOW_HTTP_REQUEST_* themselves): the sender
does the retrying. never_raises guards the tracker's public methods.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distil.pretrain.tracking.config import TrackingConfig
from distil.pretrain.tracking.params import redact_uri

logger = logging.getLogger("distil.tracking")

MAX_METRICS_PER_BATCH = 1000
PERMANENT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                         "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
                         "RESOURCE_LIMIT_EXCEEDED", "FEATURE_DISABLED", "NOT_FOUND"}


def refusal_status(error: BaseException) -> str | None:
    """"401" or "403" when the server refused the request's credentials, else None. (MLflow's REST client
    says "failed with error code 401 != 200"; a server's JSON error carries its code.)"""
    status = re.search(r"error code (401|403) != 200", str(error))
    if status:
        return status.group(1)
    return {"UNAUTHENTICATED": "401", "PERMISSION_DENIED": "403"}.get(str(getattr(error, "error_code", "")))


def refused_credentials(uri: str, error: BaseException) -> str | None:
    """The one line to print when the server refused this user's credentials (401/403), else None."""
    code = refusal_status(error)
    if code is None:
        return None
    who = os.environ.get("MLFLOW_TRACKING_USERNAME")
    said = f"the credentials of {who!r}" if who else "to work without credentials"
    return (f"the MLflow server {redact_uri(uri)} refused {said} ({code}): this run trains untracked (its "
            "metrics are in the run folder's metrics.jsonl); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) for the next run")


class Unreachable(Exception):
    """The tracking server did not answer (connection refused, timeout, 5xx): retry later."""


def is_permanent(error: Exception) -> bool:
    """A request the server answered and refused: resending it cannot help."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in PERMANENT_ERROR_CODES


def configure_http_client(timeout_s: int) -> None:
    """MLflow's REST client retries with exponential backoff for minutes by default; we retry ourselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    # The telemetry client would try to reach the internet from training nodes that often cannot.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints its own "View run ... at" links when a run ends on a server; they open the GenAI view.
    # The tracker logs the run's link in the model-training view instead (links.py).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class WarnOnce:
    """Logs the first warning for each key; later ones for the same key are dropped."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str, *args: Any) -> None:
        if key not in self._seen:
            self._seen.add(key)
            logger.warning(message, *args)


def never_raises(method: Callable) -> Callable:
    """Tracking never stops training: a failing tracker call is logged (once per method) and ignored.

    For methods of a class whose instances have a `warn_once: WarnOnce` attribute.
    """

    @functools.wraps(method)
    def guarded(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            self.warn_once(method.__name__, "tracking: %s failed and is skipped: %r", method.__name__, error)
            return None

    return guarded


@dataclass
class Outbox:
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


class Sender:
    """The one background thread that empties the Outbox into MLflow: queued operations in order, then the
    metric points in batches. An operation `(kind, *args)` is carried out by `apply(op)`; the first is the
    run's creation ("start"): until it has been tried once, start() waits."""

    def __init__(self, cfg: TrackingConfig, *, uri: str, apply: Callable[[tuple], None]) -> None:
        self.cfg = cfg
        self.uri = uri
        self.outbox = Outbox(max_metrics=cfg.max_buffered_metrics)
        self.offline = False  # the last attempt found the server unreachable
        self.disabled = False  # the run could not be created: everything queued is discarded
        self._apply = apply
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._started = threading.Event()  # the first attempt to create/resume the run is over
        self._busy = False
        self._warned_offline = False
        self._warn_refused = WarnOnce()
        self._next_try = 0.0
        self._thread = threading.Thread(target=self._send_loop, name="distil-mlflow-sender", daemon=True)

    # -- training thread ----------------------------------------------------------------------------------

    def start(self, start_op: tuple) -> None:
        """Queues the run's creation, starts the thread, waits at most start_timeout_s for the first try."""
        self.put_op(start_op)
        self._thread.start()
        self._started.wait(self.cfg.start_timeout_s)

    def put_op(self, op: tuple) -> None:
        self.outbox.put_op(op)
        self._wake.set()

    def put_metrics(self, points: list) -> None:
        self.outbox.put_metrics(points)
        self._wake.set()

    def stop(self, *last_ops: tuple) -> None:
        """Queues the last operations; the thread ends once the outbox is empty."""
        for op in last_ops:
            self.outbox.put_op(op)
        self._stopping.set()
        self._wake.set()

    def wait_until_drained(self) -> None:
        """Until the outbox is drained: up to finish_timeout_s while sending works (a model upload takes a
        while), up to finish_offline_wait_s once the server stops answering (a preempted job has a grace
        period; metrics.jsonl holds every step anyway)."""
        start = time.monotonic()
        while self._thread.is_alive():
            waited = time.monotonic() - start
            if waited >= self.cfg.finish_timeout_s or (self.offline and waited >= self.cfg.finish_offline_wait_s):
                return
            self._thread.join(0.2)

    def flush(self, timeout_s: float) -> bool:
        """Waits until everything queued so far is sent. True if drained."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox.pending() == (0, 0) and not self._busy:
                return True
            self._wake.set()
            time.sleep(0.05)
        return False

    def warn_unsent(self) -> None:
        """After the last wait: says what never reached the server, and what the buffer limit dropped."""
        ops, metrics = self.outbox.pending()
        if ops or metrics:
            logger.warning("MLflow: %d metric points and %d other records could not be sent to %s before "
                           "the run ended (the metrics are also in the run folder's metrics.jsonl)",
                           metrics, ops, redact_uri(self.uri))
        if self.outbox.dropped_metrics:
            logger.warning("MLflow: %d metric points were dropped while the server was unreachable "
                           "(buffer limit max_buffered_metrics=%d)", self.outbox.dropped_metrics,
                           self.cfg.max_buffered_metrics)

    # -- sender thread ------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            if self.offline:  # new records do not hammer a dead server: it is tried once per interval
                time.sleep(max(0.0, self._next_try - time.monotonic()))
            else:
                self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._busy = True
                self._drain()
                if self.offline:
                    self.offline = False
                    logger.info("MLflow tracking server %s reachable again; buffered records sent",
                                redact_uri(self.uri))
            except Unreachable as error:
                self._went_offline(error)
            finally:
                self._busy = False
            if self._stopping.is_set() and self.outbox.pending() == (0, 0):
                return

    def _went_offline(self, error: Unreachable) -> None:
        if not self.offline:
            self.offline = True
            if not self._warned_offline:
                self._warned_offline = True
                logger.warning(
                    "MLflow tracking server %s is unreachable (%s); training goes on, metrics are "
                    "buffered (up to %d points) and sent when it answers again (retry every %.0fs)",
                    redact_uri(self.uri), str(error.__cause__ or error)[:200],
                    self.cfg.max_buffered_metrics, self.cfg.retry_interval_s)
        self._next_try = time.monotonic() + self.cfg.retry_interval_s
        self._started.set()  # create_tracker stops waiting: training starts offline

    def _drain(self) -> None:
        """Sends all queued operations in order, then all queued metrics; raises Unreachable on an outage."""
        while True:
            with self.outbox.lock:
                op = self.outbox.ops[0] if self.outbox.ops else None
            if op is None:
                break
            if self.disabled:
                with self.outbox.lock:
                    self.outbox.ops.clear()
                    self.outbox.metrics.clear()
                return
            self._call(op)
            with self.outbox.lock:
                self.outbox.ops.popleft()
            if op[0] == "start":
                self._started.set()
        while True:
            batch = self.outbox.take_metrics(MAX_METRICS_PER_BATCH)
            if not batch or self.disabled:
                return
            try:
                self._call(("metrics", batch))
            except Unreachable:
                self.outbox.return_metrics(batch)
                raise

    def _call(self, op: tuple) -> None:
        """One operation against MLflow. Outage -> Unreachable; a refused request is logged once, dropped."""
        try:
            self._apply(op)
        except Unreachable:
            raise
        except Exception as error:  # noqa: BLE001 - tracking never stops training
            if not is_permanent(error):
                raise Unreachable(str(error)[:300]) from error
            if op[0] == "start":
                self.disabled = True  # e.g. a deleted experiment of that name: nothing can be logged
                refused = refused_credentials(self.uri, error)
                if refused is not None:
                    logger.error(refused)
                else:
                    logger.warning("MLflow tracking disabled for this run: %s", str(error)[:300])
                return
            self._warn_refused(op[0], "MLflow refused %s: %s", op[0], str(error)[:300])
