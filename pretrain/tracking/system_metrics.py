"""System metrics: MLflow's own monitors (CPU, memory, disk, network, NVIDIA/AMD GPU), one sampler per node.

Rank 0 samples node 0 (SystemMetricsLogger, owned by MlflowTracker). On a multi-node run, local rank 0 of
every other node samples its node and posts the aggregate into the torch.distributed key-value store (the
TCPStore the job already uses, served by rank 0) through a NodeReporter; rank 0 reads the reports from
there (read_node_reports) and logs them as `system/node_<i>/...`. So no rank but 0 ever opens a connection
to MLflow, and no collective is added to the training loop.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from distil.pretrain.tracking.config import TrackingConfig
from distil.pretrain.tracking.tracker import NullTracker

logger = logging.getLogger("distil.tracking")

STORE_PREFIX = "distil/system_metrics/"


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


class PeriodicThread(threading.Thread):
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


def default_store():
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
        self._thread = PeriodicThread("distil-node-reporter", cfg.system_metrics_interval_s, self._tick)
        self._thread.start()

    def _tick(self) -> None:
        self._sampler.sample()
        self._samples += 1
        if self._samples % self._per_log:
            return
        metrics = self._sampler.aggregate()
        store = self._store or default_store()
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


class SystemMetricsLogger:
    """Rank 0's side: samples node 0 every system_metrics_interval_s and, every system_metrics_samples_per_log
    samples (and once at the end), emits one point per node: node 0's aggregate plus the new reports other
    nodes put in the store. Points go to `log_points`, a newly seen node's hostname to `set_tags`.

    `step` is the next system-metrics step; a resumed run sets it past the steps its run already holds.
    """

    def __init__(self, cfg: TrackingConfig, *, num_nodes: int, store: Any | None,
                 log_points: Callable[[list], None], set_tags: Callable[[dict[str, str]], None]) -> None:
        self.cfg = cfg
        self.num_nodes = num_nodes
        self.step = 0
        self._store = store
        self._log_points = log_points
        self._set_tags = set_tags
        self._node_seq: dict[int, int] = {}
        self._known_nodes: set[int] = set()
        self._sampler: NodeSampler | None = None
        self._samples = 0
        self._thread: PeriodicThread | None = None

    def start(self) -> None:
        self._sampler = NodeSampler()
        self._samples = 0
        self._thread = PeriodicThread("distil-system-metrics", self.cfg.system_metrics_interval_s, self.tick)
        self._thread.start()

    def stop(self) -> None:
        """Stops sampling and emits what the last samples hold; nothing if sampling never started."""
        if self._thread is None:
            return
        self._thread.stop()
        self.tick(final=True)

    def tick(self, final: bool = False) -> None:
        """One sample; every samples_per_log samples (and at the end) one logged point per node."""
        self._sampler.sample()
        self._samples += 1
        if final or self._samples % max(1, self.cfg.system_metrics_samples_per_log) == 0:
            self._emit()

    def _emit(self) -> None:
        """Logs node 0's aggregate (if any samples) and any new reports other nodes put in the store."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = self.step
        points = []
        if self._samples:
            self._samples = 0
            points += [Metric(f"system/node_0/{k}", v, now, step) for k, v in self._sampler.aggregate().items()]
        for index, host, metrics in self._new_node_reports():
            if index not in self._known_nodes:
                self._known_nodes.add(index)
                self._set_tags({f"distil.node.node_{index}.hostname": host})
            points += [Metric(f"system/node_{index}/{k}", v, now, step) for k, v in metrics.items()]
        if points:
            self.step += 1
            self._log_points(points)

    def _new_node_reports(self) -> list[tuple[int, str, dict[str, float]]]:
        store = self._store or default_store()
        if store is None or not (self.num_nodes > 1 or self._store is not None):
            return []
        try:
            return read_node_reports(store, self._node_seq)
        except Exception:  # noqa: BLE001 - the store is gone at shutdown
            logger.debug("reading node reports failed", exc_info=True)
            return []
