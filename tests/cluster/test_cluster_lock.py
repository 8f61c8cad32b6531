"""One run per output folder, and a resume that leaves each metrics line once.

A live run holds `run.lock`; a second run on the folder (here 2 processes through the DeepSpeed launcher)
stops with one `error:` line naming the holder and exit status 75, having touched nothing. The holder is
then killed (SIGKILL: no clean-up) after logging steps past its last checkpoint; `--resume auto` takes the
lock over, drops those metrics lines and finishes with each step logged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cluster_helpers import (
    REPO,
    TINY_MLM,
    env,
    error_lines,
    free_port,
    latest_step,
    metric_steps,
    run,
    snapshot,
    train_cmd,
    wait_for,
)

from distil.pretrain.run.lock import RunLock

pytestmark = pytest.mark.slow


def test_lock_names_its_holder_and_is_free_once_the_holder_is_gone(tmp_path):
    """In-process: a held lock refuses a second holder (the message names host, pid and start time); the
    lock of a process that died is free, and its record is reported as taken over."""
    held = RunLock(tmp_path)
    assert held.acquire() is None
    holder = subprocess.run(
        [sys.executable, "-c", "import sys; from distil.pretrain.run.lock import RunLock, RunLocked\n"
         f"try: RunLock({str(tmp_path)!r}).acquire()\nexcept RunLocked as e: print(e); sys.exit(75)"],
        env=env(), capture_output=True, text=True, timeout=60)
    assert holder.returncode == 75 and f"pid {os.getpid()}" in holder.stdout and "started" in holder.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from distil.pretrain.run.lock import RunLock, RunLocked\n"
         f"try: RunLock({str(tmp_path)!r}).probe()\nexcept RunLocked as e: print(e); sys.exit(75)"],
        env=env(), capture_output=True, text=True, timeout=60)
    assert probe.returncode == 75 and f"pid {os.getpid()}" in probe.stdout
    RunLock(tmp_path / "nothing_here").probe()  # no lock file: nothing to refuse, nothing created
    assert not (tmp_path / "nothing_here").exists()
    held.release()
    assert (tmp_path / "run.lock").read_text() == ""  # a clean release leaves no record behind
    dead = subprocess.run([sys.executable, "-c", f"import os; from distil.pretrain.run.lock import RunLock\n"
                           f"RunLock({str(tmp_path)!r}).acquire(); os._exit(9)"], env=env(), timeout=60)
    assert dead.returncode == 9
    taker = RunLock(tmp_path)
    previous = taker.acquire()
    assert previous is not None and previous["pid"] not in (os.getpid(), None)
    taker.release()


def test_second_run_on_a_live_folder_stops_with_75_and_a_killed_run_is_taken_over(shards, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_MLM, f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=100000",
            "run.log_every=2", "checkpoint.every=40"]
    first = subprocess.Popen(train_cmd(*args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: latest_step(out) is not None, 240, "first checkpoint", first)
        # Freeze the holder where it has logged past its last checkpoint (the lines a resume must drop).
        while True:
            first.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # let a metrics line being written land
            if max(metric_steps(out)) > (latest_step(out) or 0):
                break
            first.send_signal(signal.SIGCONT)
            time.sleep(0.2)
        before = snapshot(out)
        second = run(["bash", "launch/local.sh", "configs/tiny_mlm_cpu.yaml", *args[2:], "run.max_steps=200"],
                     expect=None, timeout=300, NUM_GPUS="2", MASTER_PORT=str(free_port()))
        assert second.returncode == 75, second.stderr[-4000:]
        errors = error_lines(second.stderr)
        assert len(errors) == 1, second.stderr[-4000:]
        assert f"pid {first.pid}" in errors[0] and "in use by a live run" in errors[0], errors[0]
        assert snapshot(out) == before  # nothing touched: no file written, truncated or removed
        checkpoint, logged = latest_step(out), metric_steps(out)
        assert max(logged) > checkpoint
        first.kill()  # SIGKILL: the lock is released by the kernel, its record stays in the file
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=60)
    assert json.loads((out / "run.lock").read_text())["pid"] == first.pid
    end = checkpoint + 6
    resumed = run(train_cmd(*args, f"run.max_steps={end}", "--resume", "auto"), timeout=300)
    assert f"took over the lock of {out}, left by pid {first.pid}" in resumed.stderr, resumed.stderr[-3000:]
    assert "dropped" in resumed.stderr
    assert metric_steps(out) == list(range(2, end + 1, 2))  # each step once, in order
    assert (out / "run.lock").read_text() == ""
