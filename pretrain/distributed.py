"""The process group: launcher rank/world, one init for every launcher, the device, and seeding.

Owns `Dist` (this process's rank, local rank, world size and device), `init_distributed` (deepspeed,
torchrun, SLURM srun or a single process; gloo on CPU) with its collective timeout, the diagnosis of a rank
that went silent (`silent_ranks`), `free_port` and `seed_everything`.

A collective that waits longer than the timeout fails: with gloo (CPU) the waiting ranks raise, and
`silent_ranks` then names the rank(s) that no longer answer through a monitored barrier on a side gloo
group; with NCCL, PyTorch's watchdog aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default)
and logs the collective that timed out.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distil.common.errors import UserError
from distil.pretrain import cpu_collectives


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    timeout_s: float = 1800.0
    monitor: Any = field(default=None, repr=False)  # a gloo group for monitored barriers (world > 1)


def launcher_rank_and_world() -> tuple[int, int]:
    """RANK / WORLD_SIZE as every supported launcher (deepspeed, torchrun) sets them; 0 / 1 when run alone."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers (set by the launcher)") from None


def init_distributed(timeout_s: float = 1800.0) -> Dist:
    """One process group for every launcher (deepspeed, torchrun, SLURM srun, single process); every
    collective (and the rendezvous) fails after `timeout_s` seconds instead of waiting forever."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = datetime.timedelta(seconds=timeout_s)
    _default_group_timeout(timeout)
    if accel.device_name() == "cpu":
        cpu_collectives.load_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    local_rank = int(os.environ["LOCAL_RANK"])
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        # A launcher that gives each process one visible device (SLURM --gpus-per-task) leaves index 0.
        index = local_rank % max(1, accel.device_count())
        accel.set_device(index)
        device = torch.device(accel.device_name(index))
    world = dist.get_world_size()
    if accel.device_name() == "cpu":
        cpu_collectives.release_allreduce_buffer(dist.get_rank(), world)
    monitor = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    return Dist(dist.get_rank(), local_rank, world, device, timeout_s, monitor)


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """DeepSpeed creates its own groups (the ZeRO data-parallel group is a clone of the world) with
    `new_group()` and no timeout, which torch fills from its module defaults (30 min for gloo, 10 for NCCL),
    not from the default group's. Setting those defaults makes every later group use ours too."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if getattr(distributed_c10d, "default_pg_nccl_timeout", None) is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce; no-op alone)."""
    if d.world_size == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def is_collective_timeout(error: BaseException) -> bool:
    """A collective (or store operation) that waited past the process group's timeout."""
    return isinstance(error, RuntimeError) and bool(re.search(r"timed out|timeout", str(error), re.IGNORECASE))


def silent_ranks(d: Dist, wait_s: float) -> str:
    """After a collective timed out: which ranks still answer, through a monitored barrier on the side gloo
    group (every live rank that timed out calls this). Returns a phrase for the error line."""
    if d.monitor is None:
        return "no other rank to blame"
    try:
        dist.monitored_barrier(group=d.monitor, timeout=datetime.timedelta(seconds=wait_s), wait_all_ranks=True)
    except RuntimeError as e:
        text = str(e)
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if found:
            ranks = [r.strip() for r in found.group(1).split(",") if r.strip()]
            return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} went silent (no answer within " \
                   f"{wait_s:g} s)"
        if d.rank != 0:
            return f"rank 0 did not answer within {wait_s:g} s (it went silent, or is naming the silent rank)"
        return f"the silent rank could not be named ({text.splitlines()[0][:200]})"
    return "every rank answers again: a collective was slower than the timeout (raise engine.collective_timeout_s)"


def free_port() -> int:
    """A TCP port free on this host right now (for a single process's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier(world_size: int) -> None:
    """A barrier when more than one process runs (a no-op alone or before the group exists)."""
    if dist.is_initialized() and world_size > 1:
        dist.barrier()
