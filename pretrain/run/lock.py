"""One run per output folder: global rank 0 holds a lock on `<run.output_dir>/run.lock` while it trains.

The lock is a POSIX record lock (fcntl, what `flock` becomes on NFS): the kernel (or the NFS server, once
the dead client's lease expires) releases it when the holding process ends, however it ends, so a lock whose
holder is gone is simply free again and the next run takes it over. It is not inherited by forked
DataLoader workers, so a worker outliving its rank cannot keep a folder locked. The file holds who holds it
(host, pid, start time, SLURM job if any) for the error a second run prints, and is emptied when the run
ends normally, so a record found by the next holder means a run died holding the lock (it is logged as
taken over). The file is never deleted: deleting a lock file races with a run opening it.

A run that finds the lock held raises RunLocked: the CLI prints one `error:` line naming the holder and
exits 75 (EX_TEMPFAIL, "try again later") without having written anything. Every rank first probes the
lock (`probe`: a shared lock taken and dropped at once, creating nothing), before it reads the folder's
checkpoints, so a live run's folder is refused before anything else is said about it; global rank 0
then takes the exclusive lock once the process group exists.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("distil.train")

LOCK_NAME = "run.lock"


class RunLocked(Exception):
    """The output folder is in use by a live run (the message names it)."""


def holder_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        if os.environ.get(name):
            info[name.lower()] = os.environ[name]
    return info


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "a run whose lock file names no holder yet"
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
    if info.get("slurm_job_id"):
        text += f", SLURM job {info['slurm_job_id']}"
    return text


class RunLock:
    """The output folder's lock; `acquire` takes it or raises RunLocked, `release` (or process exit) frees it."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any] | None:
        # Through the lock's own descriptor: closing any other descriptor of the file would drop our lock.
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def _locked(self, holder: dict[str, Any] | None) -> RunLocked:
        return RunLocked(f"{self.path.parent} is in use by a live run ({describe(holder)}; lock file "
                         f"{self.path}): wait for it to end, stop it, or set run.output_dir to another folder")

    def _try(self, fd: int, mode: int) -> bool:
        """True when the lock was taken; False when another process holds a conflicting one."""
        try:
            fcntl.lockf(fd, mode | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise RuntimeError(f"cannot lock {self.path}: {e.strerror} (does this filesystem support POSIX "
                               "locks? on Lustre mount with -o flock)") from e
        return True

    def probe(self) -> None:
        """Raises RunLocked when a live run holds the lock. Creates nothing, writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return  # no lock file (no run yet) or none readable: acquire() decides
        try:
            if not self._try(fd, fcntl.LOCK_SH):
                raise self._locked(self._read(fd))
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def acquire(self, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
        """Takes the lock; returns the previous holder's record when one was left behind (taken over)."""
        if self.fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for attempt in range(6):
                if self._try(fd, fcntl.LOCK_EX):
                    break
                holder = self._read(fd)
                if holder or attempt == 5:  # a named holder; or no record yet after a second: a starting run
                    raise self._locked(holder)
                sleep(0.2)  # held without a record: another run's probe, which lets go at once
        except BaseException:
            os.close(fd)
            raise
        previous = self._read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self.fd = fd
        if previous:
            log.info("took over the lock of %s, left by %s (no longer running)", self.path.parent,
                     describe(previous))
        return previous

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)  # a record left in the file means its holder died holding the lock
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
