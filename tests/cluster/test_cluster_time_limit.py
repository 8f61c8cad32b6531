"""Scheduled jobs: run.time_limit_minutes stops at an update boundary with a checkpoint and exit status 3
("more to do"); the next `--resume auto` continues and finishes (0); one more exits 0 at once, touching
nothing."""

from __future__ import annotations

import pytest
from cluster_helpers import TINY_MLM, latest_step, metric_steps, run, snapshot, train_cmd

pytestmark = pytest.mark.slow


def test_time_limit_more_to_do_then_finish_then_nothing_to_do(shards, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_MLM, f"data.shards={shards}", f"run.output_dir={out}", "run.log_every=2",
            "checkpoint.every=100000"]
    first = run(train_cmd(*args, "run.max_steps=100000", "run.time_limit_minutes=0.1", "--resume", "auto"),
                expect=3)
    assert "stopped early with a checkpoint written" in first.stderr
    stopped = latest_step(out)
    assert stopped is not None and 0 < stopped < 100000  # checkpointed where the limit was reached
    assert not (out / "export").exists() and not (out / "finished.json").exists()
    end = stopped + 4
    run(train_cmd(*args, f"run.max_steps={end}", "--resume", "auto"))
    assert latest_step(out) == end and (out / "export" / "model.safetensors").is_file()
    steps = metric_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == end
    before = snapshot(out)
    again = run(train_cmd(*args, f"run.max_steps={end}", "--resume", "auto"))
    assert "already finished; nothing to do" in again.stderr
    assert snapshot(out) == before
