"""Scheduled jobs through the shipped recurring-job entry (launch/distil.cron -> launch/scheduled.sh, the
local mode: launch/local.sh and the DeepSpeed launcher): each window trains until run.time_limit_minutes
(the window less its margin), checkpoints and exits 3, "more to do"; the next window continues and
finishes (0); a window after that exits 0 at once, touching nothing. cron itself is not run here: its
timing is cron's; what it starts is the command below. The SLURM mode of the same script is tested in
test_cluster_slurm.py."""

from __future__ import annotations

import shlex
import stat

import pytest
from cluster_helpers import REPO, TINY_MLM, free_port, latest_step, metric_steps, run, snapshot

pytestmark = pytest.mark.slow


def test_cron_entries_call_the_scheduled_window_script():
    lines = [line for line in (REPO / "launch" / "distil.cron").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines, "launch/distil.cron has no active entry"
    for line in lines:
        fields = line.split(None, 5)
        assert len(fields) == 6 and "launch/scheduled.sh" in shlex.split(fields[5]), line
    script = REPO / "launch" / "scheduled.sh"
    assert script.stat().st_mode & stat.S_IXUSR


def window(minutes: str, args: list[str], expect: int, margin: str = "0"):
    return run(["bash", "launch/scheduled.sh", minutes, *args], expect=expect, NUM_GPUS="1",
               MASTER_PORT=str(free_port()), DISTIL_WINDOW_MARGIN_MINUTES=margin)


def test_windows_more_to_do_then_finish_then_nothing_to_do(shards, tmp_path):
    out = tmp_path / "run"
    args = ["configs/tiny_mlm_cpu.yaml", *TINY_MLM[2:], f"data.shards={shards}", f"run.output_dir={out}",
            "run.log_every=2", "checkpoint.every=100000"]
    first = window("0.15", [*args, "run.max_steps=100000"], expect=3, margin="0.05")  # 6 s of training time
    assert "stopped early with a checkpoint written" in first.stderr
    stopped = latest_step(out)
    assert stopped is not None and 0 < stopped < 100000  # checkpointed where the limit was reached
    assert not (out / "export").exists() and not (out / "finished.json").exists()
    end = stopped + 4
    window("60", [*args, f"run.max_steps={end}"], expect=0)
    assert latest_step(out) == end and (out / "export" / "model.safetensors").is_file()
    steps = metric_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == end
    before = snapshot(out)
    again = window("60", [*args, f"run.max_steps={end}"], expect=0)
    assert "already finished; nothing to do" in again.stdout + again.stderr
    assert snapshot(out) == before


def test_a_window_too_short_for_its_margin_is_one_error():
    p = run(["bash", "launch/scheduled.sh", "1", "configs/tiny_mlm_cpu.yaml"], expect=2)
    assert p.stderr.strip().startswith("error:") and "margin" in p.stderr and len(p.stderr.splitlines()) == 1
