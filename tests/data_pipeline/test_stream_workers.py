"""The loader with DataLoader worker processes: same batches as in-process, exact resume."""

import json

import pytest
import torch
from shardset import make_shard_set, serial_of

from distil.data_pipeline.masking import MaskingConfig
from distil.data_pipeline.stream import PretrainStream

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
