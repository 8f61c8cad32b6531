"""What a tracker call costs the training loop: per-call latency of `tracker.log_metrics` (16 metrics a step)
against a live `mlflow server`, the local SQLite store and a dead server, beside a synchronous
`MlflowClient.log_batch` per step (what the loop would pay without the background sender).

    python benchmarks/bench_tracking.py [--steps 5000]

Prints a markdown table (microseconds per call: median, p99, max; seconds until everything was sent).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))

from mlflow_test_server import MlflowServer, free_port  # noqa: E402

from distil.pretrain.tracking.config import TrackingConfig
from distil.pretrain.tracking.mlflow_tracker import create_tracker  # noqa: E402

METRICS = [f"metric_{i}" for i in range(16)]


def percentiles(samples_ns: list[int]) -> tuple[float, float, float, int]:
    """median, p99, max (microseconds) and the number of calls over 10 ms."""
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    slow = sum(1 for t in ordered if t > 10_000_000)
    return statistics.median(ordered) / 1e3, p99 / 1e3, ordered[-1] / 1e3, slow


def bench_tracker(uri: str, steps: int, run_dir: Path) -> tuple[tuple[float, float, float, int], float | None]:
    cfg = TrackingConfig(tracking_uri=uri, experiment="bench", system_metrics=False, retry_interval_s=1.0,
                         finish_offline_wait_s=1.0)
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(run_dir))
    calls = []
    for step in range(steps):
        values = {name: step * 0.001 + i for i, name in enumerate(METRICS)}
        start = time.perf_counter_ns()
        tracker.log_metrics(values, step)
        calls.append(time.perf_counter_ns() - start)
    start = time.perf_counter()
    sent = tracker.flush(120) if not tracker.offline else False
    drained = time.perf_counter() - start if sent else None
    tracker.finish("FINISHED")
    return percentiles(calls), drained


def bench_sync_client(uri: str, steps: int) -> tuple[float, float, float, int]:
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench-sync") or client.get_experiment(
        client.create_experiment("bench-sync"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    calls = []
    for step in range(steps):
        now = int(time.time() * 1000)
        points = [Metric(name, step * 0.001 + i, now, step) for i, name in enumerate(METRICS)]
        start = time.perf_counter_ns()
        client.log_batch(run_id, metrics=points)
        calls.append(time.perf_counter_ns() - start)
    client.set_terminated(run_id)
    return percentiles(calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--sync-steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = MlflowServer(root / "server")
        server.start()
        try:
            rows.append(("tracker, live mlflow server", *bench_tracker(server.uri, args.steps, root / "a" / "run")))
            rows.append(("MlflowClient.log_batch per step, live server (sync)",
                         bench_sync_client(server.uri, args.sync_steps), None))
        finally:
            server.stop()
        rows.append(("tracker, local SQLite store", *bench_tracker(f"sqlite:///{root / 'local.db'}", args.steps,
                                                                   root / "b" / "run")))
        rows.append(("tracker, dead server (nothing listening)",
                     *bench_tracker(f"http://127.0.0.1:{free_port()}", args.steps, root / "c" / "run")))
    print(f"\n{args.steps} steps x {len(METRICS)} metrics (sync client: {args.sync_steps} steps)\n")
    print("| setup | median us/call | p99 us/call | max us/call | calls > 10 ms | s until all sent |")
    print("|---|---|---|---|---|---|")
    for name, (median, p99, worst, slow), drained in rows:
        sent = "-" if drained is None else f"{drained:.2f}"
        print(f"| {name} | {median:.1f} | {p99:.1f} | {worst:.1f} | {slow} | {sent} |")


if __name__ == "__main__":
    main()
