"""The streaming loader: rank split, equal batch counts, determinism, resume, sources, corrupt input."""

import contextlib
import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from shardset import make_shard_set, npy_bytes, serial_of, write_shard

from distil.common.errors import UserError
from distil.data_pipeline.manifest import MANIFEST_NAME
from distil.data_pipeline.masking import IGNORE_INDEX, MaskingConfig
from distil.data_pipeline.stream import produce
from distil.data_pipeline.stream.loader import PretrainStream

VOCAB = 1000


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory) -> Path:
    return make_shard_set(
        tmp_path_factory.mktemp("three"), [120, 70, 50], holdout_sizes=[30], vocab_size=VOCAB
    )


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("two"), [9, 6], vocab_size=VOCAB)


def plain_stream(shards, **kw) -> PretrainStream:
    kw.setdefault("batch_size", 8)
    kw.setdefault("shuffle_buffer", 32)
    kw.setdefault("masking", None)
    return PretrainStream(str(shards), **kw)


def serials(batches) -> list[int]:
    """Serial numbers of the real rows of unmasked batches (labels are the ids)."""
    out = []
    for b in batches:
        for row in b["labels"].numpy():
            out.append(serial_of(row, VOCAB))
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_batch_format(three_shards):
    stream = plain_stream(three_shards, masking=MaskingConfig())
    for batch in stream:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(t.dtype == torch.int64 and t.shape == batch["input_ids"].shape for t in batch.values())
        assert batch["input_ids"].shape[1] % 8 == 0
        real = batch["attention_mask"].bool()
        assert (batch["labels"][~real] == IGNORE_INDEX).all()
        assert int((batch["labels"] != IGNORE_INDEX).sum()) == -(-int(real.sum()) * 15 // 100)


def test_unmasked_labels_are_the_ids(three_shards):
    batch = next(iter(plain_stream(three_shards)))
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(three_shards, world_size):
    per_rank = [serials(plain_stream(three_shards, rank=r, world_size=world_size)) for r in range(world_size)]
    seen = [s for rank in per_rank for s in rank]
    assert set(seen) == set(range(240))  # every sample of the epoch
    assert len(seen) - 240 < world_size  # repeats only to even out the ranks (240 % 3 == 0, 240 % 2 == 0)
    for r in range(world_size):
        assert len(per_rank[r]) == len(set(per_rank[r]))


@pytest.mark.parametrize(
    ("fixture", "world_size"), [("three_shards", 2), ("two_shards", 4), ("two_shards", 7)]
)
def test_every_rank_yields_the_same_number_of_batches(request, fixture, world_size):
    shards = request.getfixturevalue(fixture)
    counts, declared = [], []
    for rank in range(world_size):
        stream = plain_stream(shards, rank=rank, world_size=world_size, batch_size=2)
        declared.append(stream.batches_per_epoch())
        counts.append(len(list(stream)))
    assert len(set(counts)) == 1 and counts == declared and counts[0] > 0


def test_token_budget_equal_counts_and_within_budget(three_shards):
    counts = []
    for rank in range(2):
        stream = plain_stream(three_shards, batch_size=None, max_tokens=256, rank=rank, world_size=2)
        batches = list(stream)
        assert len(batches) == stream.batches_per_epoch()
        assert all(b["input_ids"].numel() <= 256 for b in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch_size": None}, "exactly one"),
        ({"max_tokens": 512}, "exactly one"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"seed": -1}, "seed"),
        ({"split": "validation"}, "split"),
    ],
)
def test_bad_settings_are_user_errors(three_shards, kw, message):
    with pytest.raises(UserError, match=message):
        plain_stream(three_shards, **kw)


def test_max_tokens_below_one_sequence_is_a_user_error(three_shards):
    with pytest.raises(UserError, match="max_tokens"):
        plain_stream(three_shards, batch_size=None, max_tokens=32)


def test_deterministic_and_reshuffled_each_epoch(three_shards):
    masked = functools.partial(plain_stream, three_shards, masking=MaskingConfig(), seed=3)
    a, b = list(masked()), list(masked())
    assert same_batches(a, b)
    other = masked()
    other.set_epoch(1)
    c = list(other)
    assert not same_batches(a, c)
    assert sorted(serials(plain_stream(three_shards, seed=3))) == sorted(
        serials(plain_stream(three_shards, seed=4))
    )
    assert serials(plain_stream(three_shards, seed=3)) != serials(plain_stream(three_shards, seed=4))


def test_fresh_mask_for_a_sequence_in_a_new_epoch(three_shards):
    def masks_by_serial(epoch):
        unmasked = plain_stream(three_shards, seed=5)
        masked = plain_stream(three_shards, seed=5, masking=MaskingConfig())
        unmasked.set_epoch(epoch)
        masked.set_epoch(epoch)
        out = {}
        for u, m in zip(unmasked, masked, strict=True):
            for row_u, row_m in zip(u["labels"].numpy(), m["labels"].numpy(), strict=True):
                out[serial_of(row_u, VOCAB)] = tuple(np.flatnonzero(row_m != IGNORE_INDEX))
        return out

    e0, e1 = masks_by_serial(0), masks_by_serial(1)
    assert set(e0) == set(e1)
    assert sum(e0[s] != e1[s] for s in e0) > 0.9 * len(e0)


@pytest.mark.parametrize(
    ("world_size", "batching"),
    [(1, {"batch_size": 8}), (2, {"batch_size": 8}), (2, {"batch_size": None, "max_tokens": 192})],
)
def test_resume_at_a_random_point_yields_the_same_batches(three_shards, world_size, batching):
    rng = np.random.default_rng(11)
    for rank in range(world_size):
        make = functools.partial(
            plain_stream, three_shards, masking=MaskingConfig(), seed=2, rank=rank, world_size=world_size,
            **batching,
        )  # fmt: skip
        reference = make()
        reference.set_epoch(1)
        full = list(reference)
        stop = int(rng.integers(1, len(full)))
        first = make()
        first.set_epoch(1)
        head = []
        for batch in first:
            head.append(batch)
            if len(head) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # the current epoch: keeps the position
        tail = list(resumed)
        assert same_batches(head + tail, full)
        assert resumed.stats()["batches"] == len(full)


def test_resume_inside_a_chunk_past_whole_mask_groups(three_shards, monkeypatch):
    monkeypatch.setattr(produce, "MASK_GROUP", 3)  # chunks of 16 batches: 6 mask groups
    make = functools.partial(
        plain_stream, three_shards, batch_size=4, shuffle_buffer=64, masking=MaskingConfig()
    )
    full = list(make())
    positions = set()
    for stop in (1, 3, 7, 20, 35):
        first = make()
        head = [b for _, b in zip(range(stop), first, strict=False)]  # range first: no extra pull
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        positions.add(resumed.state_dict()["batch_in_chunk"])
        assert same_batches(head + list(resumed), full)
    assert max(positions) > 3  # resumed past at least one whole mask group


def test_resume_from_the_end_of_an_epoch_goes_on_with_the_next(three_shards):
    first = plain_stream(three_shards, masking=MaskingConfig())
    list(first)
    resumed = plain_stream(three_shards, masking=MaskingConfig())
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == []
    resumed.set_epoch(1)
    reference = plain_stream(three_shards, masking=MaskingConfig())
    reference.set_epoch(1)
    assert same_batches(list(resumed), list(reference))


def test_resume_with_other_settings_is_refused(three_shards):
    state = plain_stream(three_shards, seed=1).state_dict()
    with pytest.raises(UserError, match="seed"):
        plain_stream(three_shards, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="partitions"):
        plain_stream(three_shards, seed=1, partitions=3).load_state_dict(state)


def test_holdout_split_and_rewind(three_shards):
    stream = plain_stream(three_shards, split="holdout", masking=MaskingConfig())
    first = list(stream)
    assert list(stream) == []  # the epoch is used up
    stream.rewind()
    assert same_batches(list(stream), first)
    assert set(serials(plain_stream(three_shards, split="holdout"))) == set(range(240, 270))


@contextlib.contextmanager
def http_server(folder: Path):
    """Serves `folder` on 127.0.0.1 at a free port from a thread; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="http(s) shards are streamed with curl")


@needs_curl
def test_http_served_shards_match_local(three_shards):
    with http_server(three_shards) as url:
        remote = list(plain_stream(url, masking=MaskingConfig(), seed=4))
    assert same_batches(remote, list(plain_stream(three_shards, masking=MaskingConfig(), seed=4)))


@needs_curl
def test_http_shard_gone_mid_run_is_skipped_and_counted(tmp_path):
    shards = make_shard_set(tmp_path, [40, 40], vocab_size=VOCAB)
    with http_server(shards) as url:
        stream = plain_stream(url, batch_size=4)
        (shards / "train-000000.tar").unlink()  # after the start-up check: a 404 at read time
        got = serials(stream)
    assert set(got) == set(range(40, 80))
    assert stream.stats()["skipped_shards"] >= 1 and stream.stats()["skipped_samples"] >= 40


def test_pipe_command_shards_match_local(three_shards):
    piped = list(plain_stream(f"pipe:cat {three_shards}/{{path}}", masking=MaskingConfig()))
    assert same_batches(piped, list(plain_stream(three_shards, masking=MaskingConfig())))


def test_pipe_without_placeholder_is_a_user_error(three_shards):
    with pytest.raises(UserError, match="placeholder"):
        plain_stream(f"pipe:cat {three_shards}/manifest.json")


def test_failing_pipe_command_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="failed"):
        plain_stream(f"pipe:cat {tmp_path}/nowhere/{{path}}")


def test_missing_shard_is_a_clear_error_at_start(tmp_path):
    shards = make_shard_set(tmp_path, [20, 20], vocab_size=VOCAB)
    (shards / "train-000001.tar").unlink()
    with pytest.raises(UserError, match="train-000001.tar"):
        plain_stream(shards)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="manifest"):
        plain_stream(tmp_path)


def test_truncated_tar_is_skipped_and_counted(tmp_path):
    shards = make_shard_set(tmp_path, [60, 60, 60], vocab_size=VOCAB)
    path = shards / "train-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])
    stream = plain_stream(shards, batch_size=4)
    got = serials(stream)
    stats = stream.stats()
    assert stats["skipped_shards"] == 1
    assert 20 < stats["skipped_samples"] < 60
    assert set(range(0, 60)) | set(range(120, 180)) <= set(got)
    assert len(list(plain_stream(shards, batch_size=4))) == stream.batches_per_epoch()  # count kept


def test_undecodable_and_pickled_samples_are_skipped(tmp_path):
    shards = make_shard_set(tmp_path, [30], vocab_size=VOCAB)
    bad_samples = [
        ("bad0", b"not an npy file"),
        ("bad1", _pickled_npy()),
        ("bad2", npy_bytes(np.array([2, 5, VOCAB + 5, 3], dtype=np.int32))),  # id outside the vocabulary
        ("bad3", npy_bytes(np.zeros((2, 3), dtype=np.int64))),  # not a sequence
    ]
    write_shard(shards / "train-000001.tar", bad_samples)
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    manifest["shards"].append({"path": "train-000001.tar", "samples": 4, "tokens": 16})
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest))
    stream = plain_stream(shards, batch_size=4)
    got = serials(stream)
    assert set(got) == set(range(30))
    # the 4 missing rows are made up by starting a second pass, so the batch count stays as declared
    assert len(got) == 34 and stream.stats()["extra_passes"] == 1
    assert stream.stats()["skipped_samples"] >= 4


def _pickled_npy() -> bytes:
    """An .npy of dtype object: loading it would unpickle, which the loader refuses."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_all_corrupt_shards_error_instead_of_hanging(tmp_path):
    shards = make_shard_set(tmp_path, [20], vocab_size=VOCAB)
    (shards / "train-000000.tar").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="no readable sample"):
        list(plain_stream(shards))
