"""The process group: launcher rank/world, one init for every launcher, the device, and seeding.

Owns `Dist` (this process's rank, local rank, world size and device), `init_distributed` (deepspeed,
torchrun, SLURM srun or a single process; gloo on CPU), `free_port` and `seed_everything`.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distil.common.errors import UserError


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def launcher_rank_and_world() -> tuple[int, int]:
    """RANK / WORLD_SIZE as every supported launcher (deepspeed, torchrun) sets them; 0 / 1 when run alone."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers (set by the launcher)") from None


def init_distributed() -> Dist:
    """One process group for every launcher (deepspeed, torchrun, SLURM srun, single process)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


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
