"""pretrain/run/supervisor.py with stand-in launchers and ranks (real processes, no torch): a stop signal to the
job's process group reaches the ranks and not the launcher, the launch returns only once every rank has
ended, and its exit status is the ranks' (143 only when every rank stopped cleanly)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distil.pretrain.run.supervisor import decide

RANK = """
import os, signal, sys, time
from pathlib import Path
from distil.pretrain.run import supervisor
rank, mode, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
supervisor.announce_ready()
(out / f"rank{rank}.ready").touch()
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
if mode == "killed" and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(0.3 + rank)  # "writing the stop checkpoint"; rank 1 outlives the launcher
code = 128 + got[0] if got else 0
if mode == "crash" and rank == 1:
    code = 1
(out / f"rank{rank}.done").write_text(str(code))
supervisor.report_exit(code)
sys.exit(code)
"""

# Like the `deepspeed` command: starts the ranks, and exits at once (1) when a rank ends or on SIGTERM,
# leaving them behind.
LAUNCHER = """
import os, signal, subprocess, sys, time
rank_py, mode, out = sys.argv[1:4]
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(1))
ranks = [subprocess.Popen([sys.executable, rank_py, str(r), mode, out], env={**os.environ, 'RANK': str(r)})
         for r in range(2)]
while all(p.poll() is None for p in ranks):
    time.sleep(0.02)
sys.exit(1)
"""


def launch(tmp_path: Path, mode: str) -> tuple[int, str]:
    (tmp_path / "rank.py").write_text(textwrap.dedent(RANK))
    (tmp_path / "launcher.py").write_text(textwrap.dedent(LAUNCHER))
    env = {k: v for k, v in os.environ.items() if k != "DISTIL_RANK_STATUS_DIR"}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "distil.pretrain.run.supervisor", "--", sys.executable,
                             str(tmp_path / "launcher.py"), str(tmp_path / "rank.py"), mode, str(tmp_path)],
                            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "the ranks never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the job's group: the supervisor only (the launcher has its own)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_a_stop_returns_after_every_rank_with_143(tmp_path):
    status, err = launch(tmp_path, "stop")
    assert status == 143, err
    # both ranks had finished when the launch returned, though the launcher left before rank 1 did
    assert (tmp_path / "rank0.done").read_text() == "143" and (tmp_path / "rank1.done").read_text() == "143"
    assert "2 rank(s) ended with status 143" in err


def test_a_rank_failing_during_the_stop_makes_the_launch_fail(tmp_path):
    status, err = launch(tmp_path, "crash")
    assert status == 1 and "rank 1 failed with status 1" in err, err
    assert (tmp_path / "rank0.done").read_text() == "143"


def test_a_rank_killed_without_a_status_makes_the_launch_fail(tmp_path):
    status, err = launch(tmp_path, "killed")
    assert status == 1 and "rank 1 ended without an exit status" in err, err


@pytest.mark.parametrize(("exits", "launcher", "expected"), [
    ({1: "0 0", 2: "1 0"}, 0, 0),
    ({1: "0 3", 2: "1 3"}, 1, 3),  # torchrun reports 1 for a rank's 3: the ranks' own status counts
    ({1: "0 143", 2: "1 3"}, 1, 143),  # a stop over "more to do"
    ({1: "0 143", 2: "1 2"}, 1, 2),  # a failure over a stop
    ({}, 2, 2),  # no rank started: the launcher's status
])
def test_decide(exits, launcher, expected):
    ready = {pid: text.split()[0] for pid, text in exits.items()}
    assert decide(ready, exits, launcher)[0] == expected
