"""A rank that hangs (SIGSTOP, as a stuck node or driver) makes the others fail within
engine.collective_timeout_s plus a margin, with one error line naming the silent rank.

The two ranks are started directly with the launchers' environment contract (RANK, WORLD_SIZE,
MASTER_ADDR/PORT), so the test measures the trainer, not a launcher's clean-up: the DeepSpeed launcher and
torchrun then stop the remaining processes (SIGTERM, SIGKILL after 30 s), srun after its --wait.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from cluster_helpers import REPO, TINY_MLM, env, error_lines, free_port, metric_steps, train_cmd, wait_for

pytestmark = pytest.mark.slow

TIMEOUT_S = 8


def test_a_stopped_rank_makes_the_others_exit_nonzero_naming_it(shards, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_MLM, f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=100000",
            "run.log_every=2", "checkpoint.every=100000", f"engine.collective_timeout_s={TIMEOUT_S}"]
    port = str(free_port())
    procs = [subprocess.Popen(train_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port))
             for r in range(2)]
    try:
        wait_for(lambda: len(metric_steps(out)) >= 2, 300, "training steps", procs[0])
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        log, _ = procs[0].communicate(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    assert procs[0].returncode == 1, log[-4000:]
    # the timeout, then a monitored barrier of at most the same length to name the silent rank
    assert took < 2 * TIMEOUT_S + 15, took
    errors = error_lines(log)
    assert len(errors) == 1, log[-4000:]
    assert "rank 1 went silent" in errors[0] and f"engine.collective_timeout_s={TIMEOUT_S}" in errors[0], errors[0]
