"""pretrain/tracking/transport.py directly, with a fake `apply` instead of a server: an outage keeps the
metrics (bounded, oldest dropped) and sends them in order once the server answers, with one warning; a refused
run creation disables the run, and refused credentials say which variables to set."""

from __future__ import annotations

import logging
import threading

from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from distil.pretrain.tracking.config import TrackingConfig
from distil.pretrain.tracking.transport import Outbox, Sender, refused_credentials


def test_the_outbox_keeps_the_newest_points_and_counts_the_dropped():
    box = Outbox(max_metrics=3)
    box.put_metrics([1, 2])
    box.put_metrics([3, 4, 5])
    assert list(box.metrics) == [3, 4, 5] and box.dropped_metrics == 2
    taken = box.take_metrics(2)
    box.return_metrics(taken)  # a batch that could not be sent goes back in front, in order
    assert list(box.metrics) == [3, 4, 5] and box.pending() == (0, 3)


class FlakyServer:
    """Refuses connections for the first `down` calls, then records what it is sent."""

    def __init__(self, down: int):
        self.down = down
        self.calls = 0
        self.received: list = []
        self.lock = threading.Lock()

    def __call__(self, op: tuple) -> None:
        with self.lock:
            self.calls += 1
            if self.calls <= self.down:
                raise ConnectionError("connection refused")
            self.received.append(op)


def test_an_outage_keeps_the_metrics_and_sends_them_in_order_with_one_warning(caplog):
    cfg = TrackingConfig(retry_interval_s=0.05, start_timeout_s=5.0, finish_timeout_s=20.0)
    server = FlakyServer(down=3)
    sender = Sender(cfg, uri="http://user:secret@127.0.0.1:1", apply=server)
    with caplog.at_level(logging.WARNING, logger="distil.tracking"):
        sender.start(("start",))
        for step in range(1, 6):
            sender.put_metrics([("loss", step)])
        sender.stop(("finish",))
        sender.wait_until_drained()
    assert server.received[0] == ("start",) and ("finish",) in server.received
    sent = [p for op in server.received if op[0] == "metrics" for p in op[1]]
    assert sent == [("loss", s) for s in range(1, 6)]
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "secret" not in warnings[0]


def test_refused_credentials_disable_the_run_in_one_line_naming_what_to_set(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    refused = MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 401 != 200",
                              error_code=databricks_pb2.UNAUTHENTICATED)

    def apply(op):
        raise refused

    cfg = TrackingConfig(retry_interval_s=0.05, start_timeout_s=5.0, finish_timeout_s=5.0)
    sender = Sender(cfg, uri="http://127.0.0.1:1", apply=apply)
    with caplog.at_level(logging.WARNING, logger="distil.tracking"):
        sender.start(("start",))
        sender.put_metrics([("loss", 1)])
        sender.stop(("finish",))
        sender.wait_until_drained()
    assert sender.disabled
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "refused the credentials of 'alice' (401)" in errors[0].getMessage()
    assert refused_credentials("http://x", RuntimeError("timed out")) is None
    assert refused_credentials("http://x", RuntimeError("run 4011403 not found")) is None  # digits, not a status
    forbidden = MlflowException("no", error_code=databricks_pb2.PERMISSION_DENIED)
    assert "(403)" in refused_credentials("http://x", forbidden)
