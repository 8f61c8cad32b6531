"""SIGTERM to the process group of a 2-process run started through each shipped launcher (and of one process
started without a launcher), as a cluster, a pod's
stop or Ctrl-C delivers it: every process of the job gets it (launcher, ranks and their loader workers).

Each case runs with only the stop able to checkpoint (checkpoint.every beyond the run; one case with a
periodic checkpoint, signalled while it is being written) and requires, at the moment the launch command
returns: exit status 143, no process of the run left, and a complete, intact checkpoint at the step where the
run stopped (the last step in metrics.jsonl, logged every step), which is the only checkpoint there.
The moments cover the launcher's start, the ranks' set-up, the loader's start, steps, and a periodic
checkpoint; with loader workers (data.num_workers=2, as the recipe configs) and without.
The SLURM launch script gets the same check in test_cluster_slurm.py, with loader workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import REPO, TINY_MLM, env, free_port, metric_steps

from distil.pretrain.checkpoint.files import COMPLETE, damage, tag_for

pytestmark = pytest.mark.slow


def _step_logged(n: int):
    return lambda out: len(metric_steps(out)) >= n


def _locked(out: Path) -> bool:
    return (out / "run.lock").exists()


def _cmdlines() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(pid)] = (ppid, cmdline)
    return out


def _launcher_starting(out: Path) -> bool:
    """The DeepSpeed launcher runs (started by the launch script's supervisor); no rank started yet. The
    supervisor's own command line names deepspeed too, from its first instant, before Python has run any of
    it: a signal then ends it by the default action before it could start anything (nothing to lose)."""
    cmds = [cmd for _, cmd in _cmdlines().values() if f"run.output_dir={out}" in cmd]
    launcher = [c for c in cmds if "deepspeed" in c and "distil.pretrain.run.supervisor" not in c]
    return bool(launcher) and not any("-m distil.pretrain.train" in c for c in cmds)


def _loader_started(out: Path) -> bool:
    """A rank has forked its first DataLoader worker (a worker shares its rank's command line)."""
    mark = f"run.output_dir={out}"
    procs = _cmdlines()
    ranks = {pid for pid, (_, cmd) in procs.items() if mark in cmd and "-m distil.pretrain.train" in cmd}
    return any(ppid in ranks for pid, (ppid, _) in procs.items() if pid in ranks)


def _checkpoint_being_written(out: Path) -> bool:
    ckpt = out / "checkpoints"
    return ckpt.is_dir() and any(p.is_dir() and not (p / COMPLETE).exists() for p in ckpt.iterdir())


# (launcher, loader workers, moment, when to signal, extra settings)
CASES = [
    ("local", 2, "launcher start-up", _launcher_starting, []),
    ("local", 2, "ranks' set-up", _locked, []),
    ("local", 2, "loader start", _loader_started, []),
    ("local", 2, "periodic checkpoint", _checkpoint_being_written, ["checkpoint.every=2"]),
    ("local", 0, "after step 2", _step_logged(2), []),
    ("torchrun", 2, "after step 1", _step_logged(1), []),
    ("torchrun", 0, "ranks' set-up", _locked, []),
    ("hostfile", 2, "loader start", _loader_started, []),
    ("scheduled", 2, "after step 1", _step_logged(1), []),
    ("one process", 2, "loader start", _loader_started, []),
]


def _command(launcher: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    if launcher == "local":
        return ["bash", "launch/local.sh"], {"NUM_GPUS": "2"}
    if launcher == "one process":  # launch/local.sh with NUM_GPUS=1: no launcher, its workers in the group
        return ["bash", "launch/local.sh"], {"NUM_GPUS": "1"}
    if launcher == "torchrun":
        return ["bash", "launch/torchrun.sh"], {"NPROC_PER_NODE": "2"}
    if launcher == "hostfile":
        hostfile = tmp_path / "hostfile.txt"
        hostfile.write_text("node-a slots=2\n")
        return ["bash", "launch/hostfile.sh", str(hostfile)], {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    return ["bash", "launch/scheduled.sh", "600"], {"NUM_GPUS": "2"}


def _processes_of(out: Path) -> list[str]:
    return [f"{pid}: {cmd[:200]}" for pid, (_, cmd) in _cmdlines().items() if f"run.output_dir={out}" in cmd]


@pytest.mark.parametrize(("launcher", "workers", "moment", "when", "extra"), CASES,
                         ids=[f"{c[0]}-workers{c[1]}-{c[2]}".replace(" ", "_") for c in CASES])
def test_sigterm_to_the_group_stops_with_the_checkpoint_of_the_last_step(shards, tmp_path, launcher, workers,
                                                                         moment, when, extra):
    out = tmp_path / "run"
    cmd, launch_env = _command(launcher, tmp_path)
    # tiny_mlm_cpu.yaml as shipped (engine, precision, ZeRO), a smaller model; only the stop checkpoints
    args = [*TINY_MLM[1:], f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=100000",
            "run.log_every=1", "run.export=false", f"data.num_workers={workers}", "checkpoint.every=100000", *extra]
    proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=env(MASTER_PORT=str(free_port()), **launch_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not when(out):
            assert proc.poll() is None, f"the launch ended ({proc.returncode}) before the {moment}"
            assert time.monotonic() < deadline, f"no {moment} within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as SLURM, Kubernetes and Ctrl-C do
        log, _ = proc.communicate(timeout=300)
        left = _processes_of(out)  # right when the launch command returned
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, f"{moment}: exit {proc.returncode}\n{log[-6000:]}"
    assert left == [], f"processes of the run still alive when the launch returned: {left}"
    steps = metric_steps(out)
    assert steps and steps == list(range(1, len(steps) + 1)), steps
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    stopped_at = out / "checkpoints" / tag_for(steps[-1])
    assert (out / "checkpoints" / "latest").read_text().strip() == stopped_at.name, (checkpoints, steps)
    assert damage(stopped_at) is None, damage(stopped_at)
    assert (stopped_at / "checksums.json").is_file()
    periodic = {tag_for(s) for s in steps if "checkpoint.every=2" in extra and s % 2 == 0}
    assert set(checkpoints) <= periodic | {stopped_at.name}, checkpoints
