"""pretrain/distributed.py directly: the launcher's rank variables, a single-process group on the CPU
accelerator with our collective timeout in every group DeepSpeed makes, and the helpers the trainer's
hang and NaN handling rely on. (Several processes: tests/cluster/ and test_train_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distributed_helpers import run_as_launched_rank

from distil.common.errors import UserError
from distil.pretrain.distributed import (
    Dist,
    any_rank,
    is_collective_timeout,
    launcher_rank_and_world,
    silent_ranks,
)


def test_launcher_rank_variables_must_be_integers(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_rank_and_world() == (1, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert launcher_rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(UserError, match="RANK and WORLD_SIZE must be integers"):
        launcher_rank_and_world()


def test_collective_timeouts_are_told_from_other_errors():
    assert is_collective_timeout(RuntimeError("[../gloo/transport/tcp/pair.cc:598] Read error: Connection timed out"))
    assert is_collective_timeout(RuntimeError("Wait timeout after 30000ms"))
    assert not is_collective_timeout(RuntimeError("CUDA out of memory"))
    assert not is_collective_timeout(TimeoutError("timed out"))  # not a collective's RuntimeError


def test_alone_any_rank_is_the_flag_and_no_rank_is_blamed():
    import torch

    alone = Dist(0, 0, 1, torch.device("cpu"))
    assert any_rank(True, alone) and not any_rank(False, alone)
    assert silent_ranks(alone, 1.0) == "no other rank to blame"


def test_a_single_process_group_on_cpu_uses_our_timeout_everywhere(tmp_path: Path):
    """Started as a launcher starts a rank (LOCAL_SIZE set, so DeepSpeed's CPU op makes its /dev/shm
    segment): gloo, the CPU device, the timeout in the default group and in the groups made later, and the
    segment's name gone once the group has started."""
    code = """
import json, datetime
import torch.distributed as dist
from torch.distributed import distributed_c10d
from distil.pretrain import cpu_collectives
from distil.pretrain.distributed import init_distributed
d = init_distributed(42)
later = dist.new_group()
print(json.dumps({"backend": dist.get_backend(), "device": str(d.device), "world": d.world_size,
                  "default_timeout_s": distributed_c10d.default_pg_timeout.total_seconds(),
                  "monitor": d.monitor is not None,
                  "segment_left": cpu_collectives.allreduce_buffer(0).exists()}))
"""
    got = json.loads(run_as_launched_rank(code))
    assert got == {"backend": "gloo", "device": "cpu", "world": 1, "default_timeout_s": 42.0, "monitor": False,
                   "segment_left": False}
