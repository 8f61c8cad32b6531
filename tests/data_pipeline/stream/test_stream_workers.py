"""The loader with DataLoader worker processes: same batches as in-process, exact resume."""

import json

import pytest
import torch
from shardset import make_shard_set, serial_of

from distil.data_pipeline.masking import MaskingConfig
from distil.data_pipeline.stream.loader import PretrainStream

VOCAB = 1000
pytestmark = pytest.mark.slow


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def take(stream, n):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_workers_split_the_rank_and_resume_exactly(tmp_path):
    shards = make_shard_set(tmp_path, [130, 90, 60], vocab_size=VOCAB)

    def make(workers, rank=0, masking=MaskingConfig(), partitions=2):
        stream = PretrainStream(
            str(shards),
            batch_size=6,
            shuffle_buffer=24,
            num_workers=workers,
            rank=rank,
            world_size=2,
            masking=masking,
            seed=9,
            partitions=partitions,
        )
        stream.set_epoch(2)
        return stream

    in_process = list(make(0))
    with_workers = list(make(2))
    # the batch sequence does not depend on the number of workers
    assert same_batches(with_workers, in_process)

    # both ranks' workers together cover the epoch exactly once (280 samples, 140 per rank)
    unmasked = [list(make(2, rank=r, masking=None)) for r in range(2)]
    rows = [serial_of(row, VOCAB) for rank in unmasked for b in rank for row in b["labels"].numpy()]
    assert sorted(rows) == list(range(280))

    # stop at a point inside the epoch with 2 workers (partitions defaulting to 2), resume with 2 workers
    # and with none: the resumed stream keeps the saved partitions
    first = make(2, partitions=None)
    head = take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))
    for workers in (2, 0):
        resumed = make(workers, partitions=None)
        resumed.load_state_dict(state)
        assert resumed.partitions == 2
        assert same_batches(head + list(resumed), in_process)


def test_starting_workers_leaves_the_global_rng_alone(tmp_path):
    """Each start of the loader's workers drew their base seed from torch's global RNG, the one the model's
    dropout uses: a resumed run (one more start than an uninterrupted one) then dropped out differently and
    ended with other weights. The loader has its own generator."""
    shards = make_shard_set(tmp_path, [40, 30], vocab_size=VOCAB)
    stream = PretrainStream(str(shards), batch_size=4, shuffle_buffer=8, num_workers=2, seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert len(take(stream, 3)) == 3
    assert torch.equal(torch.get_rng_state(), before)


def test_workers_ignore_the_jobs_stop_signals(tmp_path):
    """SIGTERM to every process of the job (its process group, a SLURM step): the workers go on serving
    batches, so the main process can finish the update and checkpoint (PyTorch's workers die of it)."""
    import os
    import signal

    shards = make_shard_set(tmp_path, [60, 60], vocab_size=VOCAB)
    stream = PretrainStream(str(shards), batch_size=2, shuffle_buffer=8, num_workers=2, seed=3)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the main process records it, as the trainer
    try:
        batches = iter(stream)
        next(batches)
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()]
        assert len(children) >= 2, children
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        assert len([next(batches) for _ in range(20)]) == 20  # workers dead: "DataLoader worker ... killed"
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
