"""Runs a launcher (the DeepSpeed launcher, torchrun) so that a stop signal ends the launch only after every rank
has stopped, with the ranks' own exit status.

    python -P -m distil.pretrain.run.supervisor -- deepspeed --num_gpus 8 --module distil.pretrain.train ...

launch/local.sh, hostfile.sh (without ssh) and torchrun.sh start their launcher this way. Why: on SIGTERM the
`deepspeed` command exits at once while its ranks are still writing the stop checkpoint (a scheduler that sees
the job's main process end kills what is left); DeepSpeed's per-node launcher and torchrun's agent kill ranks
30 s after passing the signal on, and report a rank's 143 as their own 1 (torchrun) or whichever rank's
status came first (DeepSpeed).

How:
- The launcher runs in a session of its own, so a signal sent to the job's process group (Ctrl-C, `kill
  -TERM -PGID`, a pod's or a batch system's stop) reaches this process and not the launcher. This process is
  a child subreaper (Linux), so ranks that outlive their launcher are still waited for here.
- Each rank announces itself once its stop handler is installed (`announce_ready`). A SIGTERM/SIGINT received
  here, before or after that, is passed to every announced rank, never to the launcher: the ranks finish the
  update, write the stop checkpoint and exit 128+N; the launcher then ends on its own.
- Each rank writes its exit status on the way out (`report_exit`). Once every process below this one has
  ended, the launch exits with: the status of a rank that failed (a rank that ended without a status, killed,
  counts as failed: 1); else the ranks' status (128+N after a stop, 3 more to do, 0 finished); else, when
  no rank ever started, the launcher's own.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distil.common.signals import STOP_SIGNALS

STATUS_DIR_ENV = "DISTIL_RANK_STATUS_DIR"
_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.2


# -- rank side (called by `distil train`; kept free of torch so it runs before anything heavy) -----------------
def _status_dir() -> Path | None:
    folder = os.environ.get(STATUS_DIR_ENV)
    return Path(folder) if folder else None


def announce_ready() -> None:
    """Tells the supervisor (if any) that this rank now turns a stop signal into a checkpoint and a stop."""
    folder = _status_dir()
    if folder is not None and folder.is_dir():
        (folder / f"ready-{os.getpid()}").write_text(os.environ.get("RANK", "0") + "\n")


def report_exit(status: int) -> None:
    """Records this rank's exit status for the supervisor (if any)."""
    folder = _status_dir()
    if folder is not None and folder.is_dir():
        tmp = folder / f".exit-{os.getpid()}"
        tmp.write_text(f"{os.environ.get('RANK', '0')} {status}\n")
        tmp.rename(folder / f"exit-{os.getpid()}")


def exit_status(code: object) -> int:
    """The process exit status that `sys.exit(code)` gives."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


# -- supervisor side ---------------------------------------------------------------------------------------------
def _become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _pids(folder: Path, prefix: str) -> dict[int, str]:
    out = {}
    for f in folder.glob(f"{prefix}-*"):
        try:
            out[int(f.name.split("-", 1)[1])] = f.read_text().strip()
        except (ValueError, OSError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def decide(ready: dict[int, str], exits: dict[int, str], launcher_status: int | None) -> tuple[int, str]:
    """The launch's exit status from what the ranks reported, with the reason in words."""
    stops = {128 + int(s) for s in STOP_SIGNALS}
    statuses = [(int(rank), int(status)) for rank, status in (text.split() for text in exits.values())]
    killed = sorted(int(ready[pid]) for pid in ready if pid not in exits)
    failed = sorted((rank, s) for rank, s in statuses if s not in (0, 3) and s not in stops)
    if failed:
        return failed[0][1], f"rank {failed[0][0]} failed with status {failed[0][1]}"
    if killed:
        return 1, f"rank {killed[0]} ended without an exit status (killed)"
    if statuses:
        seen = sorted({s for _, s in statuses})
        status = max(seen, key=lambda s: (s in stops, s == 3, s))  # a stop over "more to do" over finished
        return status, f"{len(statuses)} rank(s) ended with status {' / '.join(map(str, seen))}"
    status = 1 if launcher_status is None else launcher_status
    return status, f"no rank started; the launcher exited {status}"


def supervise(cmd: list[str]) -> int:
    folder = Path(tempfile.mkdtemp(prefix="distil-ranks-"))
    pending: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: pending.append(signum))
    subreaper = _become_subreaper()
    env = {**os.environ, STATUS_DIR_ENV: str(folder)}
    try:
        launcher = subprocess.Popen(cmd, env=env, start_new_session=True)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"error: cannot start {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 2
    launcher_status: int | None = None
    told: dict[int, set[int]] = {}  # signal -> ranks told
    received: list[int] = []
    try:
        while True:
            if pending:
                received.extend(pending)
                pending.clear()
            ready = _pids(folder, "ready")
            for signum in dict.fromkeys(received):
                for pid in ready.keys() - told.setdefault(signum, set()):
                    told[signum].add(pid)
                    if _alive(pid):
                        os.kill(pid, signum)
            # reap whatever ended below us: the launcher, and ranks it left behind
            while True:
                try:
                    pid, raw = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid, raw = -1, 0
                    break
                if pid == 0:
                    break
                if pid == launcher.pid:
                    launcher_status = os.waitstatus_to_exitcode(raw)
                    if launcher_status < 0:
                        launcher_status = 128 - launcher_status
            if pid == -1 and launcher_status is not None:
                if subreaper or not any(_alive(p) for p in ready):
                    break
            time.sleep(_POLL_S)
        status, why = decide(_pids(folder, "ready"), _pids(folder, "exit"), launcher_status)
        if received or status != launcher_status:
            print(f"distil: launch exits {status}: {why}", file=sys.stderr, flush=True)
        return status
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m distil.pretrain.run.supervisor -- LAUNCHER [ARGS ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(supervise(args))


if __name__ == "__main__":
    main()
