"""The global layout (the trainer's with data.batch_size): one batch sequence for every world size, dealt
to ranks update by update, so an update's samples and masks do not depend on the world size, and a
position saved by W processes resumes on W' with the same global batch."""

import json

import pytest
from shardset import make_shard_set, serial_of

from distil.common.errors import UserError
from distil.data_pipeline.masking import MaskingConfig
from distil.data_pipeline.stream import produce
from distil.data_pipeline.stream.loader import PretrainStream

VOCAB = 1000


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shard_set(tmp_path_factory.mktemp("global"), [120, 70, 50], vocab_size=VOCAB)


def stream(shards, rank, world, per_update, masking=None, **kw):
    s = PretrainStream(str(shards), batch_size=4, shuffle_buffer=24, masking=masking, seed=3, rank=rank,
                       world_size=world, micro_batches_per_update=per_update, layout="global", **kw)
    s.set_epoch(1)
    return s


def updates(streams, per_update):
    """Per update: the sorted batches (as tuples of tensors' bytes) of every rank together."""
    per_rank = [list(s) for s in streams]
    n = len(per_rank[0]) // per_update
    assert all(len(r) == n * per_update for r in per_rank)
    out = []
    for u in range(n):
        batches = [b for r in per_rank for b in r[u * per_update:(u + 1) * per_update]]
        out.append(sorted(tuple(b[k].numpy().tobytes() for k in sorted(b)) for b in batches))
    return out


def rows(batches) -> list[int]:
    return [serial_of(row, VOCAB) for b in batches for row in b["labels"].numpy()]


@pytest.mark.parametrize(("world", "per_update"), [(2, 1), (4, 1), (2, 2)])
def test_an_update_holds_the_same_masked_batches_whatever_the_world_size(shards, world, per_update):
    group = world * per_update
    reference = updates([stream(shards, 0, 1, group, masking=MaskingConfig())], group)
    dealt = updates([stream(shards, r, world, per_update, masking=MaskingConfig()) for r in range(world)],
                    per_update)
    assert dealt == reference and len(reference) > 5


def test_every_sample_once_and_the_last_update_filled(shards):
    ranks = [list(stream(shards, r, 3, 2)) for r in range(3)]
    seen = [s for r in ranks for s in rows(r)]
    assert set(seen) == set(range(240))
    assert len(seen) - 240 < 3 * 2 * 4  # at most the batches that fill the last update
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) % 2 == 0


def test_a_rank_reads_only_the_chunks_holding_its_batches(shards, monkeypatch):
    reads = []
    original = produce.PartitionReader.read

    def counting(self, start, stop, stats):
        reads.append((start, stop))
        return original(self, start, stop, stats)

    monkeypatch.setattr(produce.PartitionReader, "read", counting)
    list(stream(shards, 0, 1, 1))
    alone = len(reads)
    reads.clear()
    list(stream(shards, 1, 2, 6))  # 2 ranks x 6 batches of 4 = one chunk of 24 each, taken in turns
    assert alone == 10 and len(reads) == alone // 2


@pytest.mark.parametrize(("saved", "resumed"), [((2, 2), (1, 4)), ((2, 2), (4, 1)), ((1, 2), (2, 1))])
def test_a_position_saved_by_w_ranks_resumes_on_w_prime(shards, saved, resumed):
    (w, a), (w2, a2) = saved, resumed
    group = w * a
    reference = [list(stream(shards, r, w, a)) for r in range(w)]
    total_updates = len(reference[0]) // a
    stop = 3  # updates taken before the checkpoint
    firsts = [stream(shards, r, w, a) for r in range(w)]
    head = []
    for s in firsts:
        taken = [b for _, b in zip(range(stop * a), s, strict=False)]
        head += taken
    states = [json.loads(json.dumps(s.state_dict())) for s in firsts]
    assert all(st["global_batches"] == stop * group for st in states)
    tails = []
    for r in range(w2):
        s = stream(shards, r, w2, a2)
        s.load_state_dict(states[0])
        tails.append(list(s))
    assert {len(t) for t in tails} == {(total_updates - stop) * a2}
    everything = rows(head) + rows([b for t in tails for b in t])
    assert sorted(everything) == sorted(rows([b for r in reference for b in r]))  # none twice, none skipped
    # and update by update, the same samples as the run that never stopped
    assert updates_from(tails, a2) == updates_from(reference, a)[stop:]


def updates_from(per_rank, per_update):
    """Per update: the sorted sample serials of every rank's batches of that update."""
    n = len(per_rank[0]) // per_update
    return [sorted(x for r in per_rank for x in rows(r[u * per_update:(u + 1) * per_update])) for u in range(n)]


def test_resume_elsewhere_needs_the_same_global_batch_and_an_update_boundary(shards):
    first = stream(shards, 0, 2, 2)
    state = first.state_dict()
    with pytest.raises(UserError, match="engine.gradient_accumulation_steps"):
        stream(shards, 0, 1, 2).load_state_dict(state)
    _ = [b for _, b in zip(range(1), first, strict=False)]  # half an update
    with pytest.raises(UserError, match="update boundary"):
        stream(shards, 0, 1, 4).load_state_dict(first.state_dict())


def test_the_global_layout_needs_a_batch_size(shards):
    with pytest.raises(UserError, match="batch_size"):
        PretrainStream(str(shards), batch_size=None, max_tokens=256, layout="global")
