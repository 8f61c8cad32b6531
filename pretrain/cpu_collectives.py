"""DeepSpeed's CPU collectives op (its shared-memory all-reduce), made safe for runs that are killed.

On the CPU accelerator DeepSpeed compiles and loads a small C++ op (`deepspeed_shm_comm`) while its process
group starts. Two of its habits made every later run on the machine fail once one run had been killed:

- The op is built by torch's JIT loader, which guards the build directory with a bare lock file (no owner
  recorded). A process killed while holding it (SIGKILL at startup: a test's or a scheduler's hard kill, a
  session ending) leaves the file, and every later process waits on it forever. `load_op` loads the op first,
  under a kernel lock of our own (`flock`, released however its holder ends), and removes a lock file that no
  process on this machine still holds open (once the compilers a killed loader left running have ended). DeepSpeed then finds the op loaded and takes no lock.
- When every rank runs on one machine the op maps one 66 MB segment per rank in /dev/shm and never removes
  it, so each run left that memory taken until the machine ran out. `release_allreduce_buffer` removes this
  rank's segment once every rank has mapped all of them; the memory goes when the last rank exits.

`scripts/setup.sh` calls `load_op` once on a CPU machine, so runs and tests load a built op.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from distil.pretrain.run import stopsignal

SHM_DIR = Path("/dev/shm")


def _builder():
    """DeepSpeed's builder of the op, or None where the accelerator has none (GPUs) or cannot build it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def _any_process_links(links: str, target: Path) -> bool:
    """Whether a /proc/<pid>/`links` entry (an open file descriptor, a working directory) of any process on this
    machine points at `target`. Processes this user cannot inspect are not seen; nor are other machines'."""
    for link in Path("/proc").glob(f"[0-9]*/{links}"):
        try:
            if os.readlink(link) == str(target):
                return True
        except OSError:
            continue
    return False


def held_open(path: Path) -> bool:
    """Whether a process has `path` open (torch's lock holder keeps it open until done)."""
    return _any_process_links("fd/*", path)


def working_in(folder: Path) -> bool:
    """Whether a process works in `folder` (the build's ninja and compilers run there; killing the loader that
    started them leaves them running to the end)."""
    return _any_process_links("cwd", folder)


def remove_abandoned_lock(lock: Path, wait_s: float = 600.0) -> bool:
    """Removes torch's build lock file if no process holds it open, once the build its holder started (if
    it still runs) has ended; True when it did."""
    if not lock.exists() or held_open(lock):
        return False
    deadline = time.monotonic() + wait_s
    while working_in(lock.parent) and time.monotonic() < deadline:
        time.sleep(0.5)
    lock.unlink(missing_ok=True)
    print(f"distil: removed {lock}, left by a process that was killed while loading DeepSpeed's CPU op",
          file=sys.stderr, flush=True)
    return True


LOAD_ATTEMPTS_AFTER_STOP = 3


def load_op() -> None:
    """Loads (building once per environment) DeepSpeed's CPU collectives op, so that DeepSpeed's own load
    while the process group starts returns it without touching the build directory's lock."""
    builder = _builder()
    if builder is None:
        return
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):  # built into the installed DeepSpeed: no JIT build, no lock
        builder.load()
        return
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(builder.name, verbose=False)).resolve()
    with open(build_dir / "distil.flock", "a") as guard:
        # Every distil process holds this while torch's lock file may exist, so a lock file found here was
        # left by a dead process unless another program (not distil) holds it open.
        fcntl.flock(guard, fcntl.LOCK_EX)
        remove_abandoned_lock(build_dir / "lock")
        for attempt in range(LOAD_ATTEMPTS_AFTER_STOP):
            try:
                builder.load(verbose=False)
                return
            except RuntimeError:
                # A stop signal sent to the whole process group (SLURM's time limit, preemption, Ctrl-C) also
                # reaches the programs torch runs while it loads the op (`ninja --version`, the build), and they
                # die of it; this process only records the signal, to stop with a checkpoint once it is set up.
                # So a load that failed after a stop signal is tried again: the signal has been delivered.
                if stopsignal.received() is None or attempt == LOAD_ATTEMPTS_AFTER_STOP - 1:
                    raise


def allreduce_buffer(rank: int) -> Path:
    """The /dev/shm segment the op makes for `rank` (named from the user id, MASTER_ADDR, MASTER_PORT and
    the rank) when every rank runs on this machine."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_allreduce_buffer(rank: int, world_size: int) -> None:
    """Removes this rank's segment's name, after the process group has started (DeepSpeed maps every
    rank's segment while it starts; the barrier waits until all ranks have). Nothing is left in /dev/shm
    however the ranks end."""
    import torch.distributed as dist

    if world_size > 1:
        dist.barrier()
    allreduce_buffer(rank).unlink(missing_ok=True)
