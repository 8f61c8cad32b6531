"""Fuzzing shard files: any damage to a shard is skipped and counted, or (nothing usable left) one UserError
line; never a traceback, never a hang. Tell-tale: samples read + samples skipped == the manifest's count."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from damage import (
    DEFAULT_CASES,
    SLOW_CASES,
    Damage,
    Outcomes,
    assert_one_line_error,
    byte_damages,
    fuzz_settings,
    rename_member,
    tar_member_names,
)
from hypothesis import given
from hypothesis import strategies as st
from shardset import make_shard_set, npy_bytes, serial_of, write_shard

from distil.common.errors import UserError
from distil.data_pipeline.stream import read
from distil.data_pipeline.stream.loader import PretrainStream

VOCAB = 1000
SAMPLES = 48  # one shard: a damage can leave nothing usable, so both promises are tried


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = make_shard_set(tmp_path_factory.mktemp("fuzz_shards"), [SAMPLES], vocab_size=VOCAB)
    path = root / "train-000000.tar"
    outcomes = Outcomes()
    yield root, path, path.read_bytes(), outcomes
    outcomes.report("shards")


def one_pass(root: Path) -> tuple[int, int, set[int]]:
    """(samples read, samples skipped, their serials) over one pass of the stream's own chunk producer."""
    stream = PretrainStream(str(root), batch_size=8, masking=None, shuffle_buffer=16)
    plan = stream._plan(0)
    read_rows, skipped, serials = 0, 0, set()
    for item in stream._producer():
        if item.chunk >= plan.chunks_per_pass:
            break
        if item.stats is not None:
            skipped += item.stats.skipped_samples
        if item.batch is not None:
            rows = item.batch["input_ids"]
            read_rows += rows.shape[0]
            serials |= {serial_of(r.numpy(), VOCAB) for r in rows}
    return read_rows, skipped, serials


def check_promise(root: Path, path: Path, original: bytes, damage: Damage, outcomes: Outcomes) -> None:
    path.write_bytes(damage.apply(original))
    try:
        read_rows, skipped, _ = one_pass(root)
        assert read_rows + skipped == SAMPLES, f"{read_rows} read + {skipped} skipped != {SAMPLES}"
        stream = PretrainStream(str(root), batch_size=8, masking=None, shuffle_buffer=16)
        try:
            batches = list(stream)
        except UserError as e:
            assert read_rows == 0, f"refused with {read_rows} readable samples: {e}"
            assert_one_line_error(e, str(root))
            outcomes[f"{damage.kind}: nothing usable -> error"] += 1
            return
        assert len(batches) == stream.batches_per_epoch()  # the batch count is kept
        stats = stream.stats()
        assert stats["skipped_samples"] >= skipped
        outcomes[f"{damage.kind}: {'all read' if skipped == 0 else 'skipped+counted'}"] += 1
    finally:
        path.write_bytes(original)


def shard_damages(original: bytes) -> st.SearchStrategy[Damage]:
    kinds = byte_damages(len(original))
    kinds["rename_member"] = rename_member(tar_member_names(original))
    return st.sampled_from(sorted(kinds)).flatmap(lambda k: kinds[k])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["overwrite", "truncate", "insert", "delete", "rename_member", "garbage"])
def test_damaged_shard_is_skipped_and_counted(shard_set, kind):
    root, path, original, outcomes = shard_set
    kinds = byte_damages(len(original))
    kinds["rename_member"] = rename_member(tar_member_names(original))

    @fuzz_settings(DEFAULT_CASES)
    @given(kinds[kind])
    def case(damage):
        check_promise(root, path, original, damage, outcomes)

    case()


def test_empty_shard_is_an_error_naming_the_set(shard_set):
    root, path, original, outcomes = shard_set
    check_promise(root, path, original, Damage("empty"), outcomes)
    assert outcomes["empty: nothing usable -> error"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_damaged_shard_slow_tier(shard_set):
    root, path, original, outcomes = shard_set

    @fuzz_settings(SLOW_CASES * 6)
    @given(shard_damages(original))
    def case(damage):
        check_promise(root, path, original, damage, outcomes)

    case()


def test_npy_header_token_error_is_a_skipped_sample(tmp_path, caplog):
    """The reported crash: a damaged header makes numpy's parser raise tokenize.TokenError."""
    root = make_shard_set(tmp_path, [10], vocab_size=VOCAB)
    good = npy_bytes(np.arange(5, 20, dtype=np.uint16))
    head = b"{'descr': '<u2', 'fortran_order': False, 'shape': ("
    bad = bytearray(good)
    bad[10 : 10 + 60] = head.ljust(60)  # np.load: tokenize.TokenError('EOF in multi-line statement')
    with pytest.raises(Exception) as raised:
        np.load(io.BytesIO(bytes(bad)), allow_pickle=False)
    assert type(raised.value).__name__ == "TokenError"
    shard = root / "train-000000.tar"
    with tarfile.open(shard) as tar:
        samples = [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar.getmembers()]
    samples[3] = (samples[3][0], bytes(bad))
    samples[7] = (samples[7][0], bytes(bad))
    write_shard(shard, samples)
    read._warned_shards.clear()
    with caplog.at_level(logging.WARNING, logger="distil.data_pipeline.stream.read"):
        read_rows, skipped, serials = one_pass(root)
    assert (read_rows, skipped) == (8, 2)
    assert serials == set(range(10)) - {3, 7}
    named = [r for r in caplog.records if str(shard) in r.getMessage()]
    assert len(named) == 1 and "TokenError" in named[0].getMessage()  # the shard is named once
