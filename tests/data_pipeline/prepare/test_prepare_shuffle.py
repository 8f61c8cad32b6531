"""`distil prepare` shuffles each split as a whole (seeded external shuffle) unless --no-shuffle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from prepare_helpers import (
    all_file_bytes,
    make_documents,
    manifest_of,
    read_split,
    run_prepare,
)

from distil.data_pipeline.manifest import MANIFEST_NAME, SAMPLE_KEY, TOKEN_COUNTS_NAME, load_manifest
from distil.data_pipeline.prepare import shards, stage
from distil.data_pipeline.prepare.shards import Members, ShardSetWriter, npy_bytes
from distil.data_pipeline.prepare.shuffle import ExternalShuffle, bucket_count

MAX_LEN = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(line for doc in make_documents(150, seed=3) for line in doc) + "\n")
    return path


def _prepare(corpus: Path, out: Path, tokenizer_dir: Path, *extra: str) -> None:
    result = run_prepare(["--input", str(corpus), "--output", str(out), "--tokenizer", str(tokenizer_dir),
                          "--max-seq-len", str(MAX_LEN), "--workers", "1", "--shard-size-mb", "0.02", *extra])
    assert result.exit_code == 0, result.output + result.stderr


def _samples(folder: Path, holdout: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(ids.tolist())) for key, ids in read_split(folder, holdout)]


def _config(corpus: Path, out: Path, tokenizer_dir: Path, **overrides) -> stage.PrepareConfig:
    settings = dict(inputs=[str(corpus)], output=out, tokenizer=str(tokenizer_dir), max_seq_len=MAX_LEN,
                    workers=1, progress=False, batch_bytes=4000, shard_size_mb=0.02, holdout_fraction=0.2,
                    shuffle_bucket_bytes=20_000)
    settings.update(overrides)
    return stage.PrepareConfig(**settings)


def test_shuffled_shards_hold_the_same_sequences_in_another_order(tmp_path, corpus, tokenizer_dir):
    _prepare(corpus, tmp_path / "plain", tokenizer_dir, "--no-shuffle", "--holdout-fraction", "0.2")
    _prepare(corpus, tmp_path / "shuffled", tokenizer_dir, "--holdout-fraction", "0.2")
    plain, shuffled = manifest_of(tmp_path / "plain"), manifest_of(tmp_path / "shuffled")
    assert not plain.shuffled and shuffled.shuffled and shuffled.seed == plain.seed == 0
    for holdout in (False, True):
        ordered, mixed = _samples(tmp_path / "plain", holdout), _samples(tmp_path / "shuffled", holdout)
        assert len(ordered) > 20
        assert sorted(mixed) == ordered  # keys keep the corpus position: the same (key, ids) pairs
        assert mixed != ordered
    # the neighbours of the corpus are spread: few consecutive pairs survive
    position = {key: i for i, (key, _) in enumerate(_samples(tmp_path / "plain"))}
    order = [position[key] for key, _ in _samples(tmp_path / "shuffled")]
    assert sum(b == a + 1 for a, b in zip(order, order[1:], strict=False)) < len(order) // 20
    assert plain.stats == shuffled.stats and plain.total_tokens == shuffled.total_tokens
    assert sum(s.samples for s in plain.holdout_shards) == sum(s.samples for s in shuffled.holdout_shards)
    assert (tmp_path / "plain" / TOKEN_COUNTS_NAME).read_bytes() == (tmp_path / "shuffled" / TOKEN_COUNTS_NAME).read_bytes()
    assert "--no-shuffle" in plain.command and "--no-shuffle" not in shuffled.command
    # the manifest's per-shard counts describe the shuffled shards
    for info in shuffled.shards:
        lengths = [len(ids) for ids in read_shard(tmp_path / "shuffled" / info.path)]
        assert (len(lengths), sum(lengths)) == (info.samples, info.tokens)


def test_another_seed_gives_another_order(tmp_path, corpus, tokenizer_dir):
    _prepare(corpus, tmp_path / "a", tokenizer_dir)
    _prepare(corpus, tmp_path / "b", tokenizer_dir, "--seed", "1")
    a, b = _samples(tmp_path / "a"), _samples(tmp_path / "b")
    assert sorted(a) == sorted(b) and a != b
    assert manifest_of(tmp_path / "b").seed == 1


def test_many_buckets_are_deterministic_and_leave_no_temporary_files(tmp_path, corpus, tokenizer_dir):
    manifest = stage.prepare(_config(corpus, tmp_path / "a", tokenizer_dir))
    assert bucket_count(stage.expected_shard_bytes([corpus_source(corpus)]), 20_000) > 10
    first = all_file_bytes(tmp_path / "a")
    stage.prepare(_config(corpus, tmp_path / "a", tokenizer_dir, overwrite=True))
    assert all_file_bytes(tmp_path / "a") == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left
    assert not [name for name in first if "shuffle" in name or "bucket" in name]
    stage.prepare(_config(corpus, tmp_path / "plain", tokenizer_dir, shuffle=False))
    for holdout in (False, True):
        mixed, ordered = _samples(tmp_path / "a", holdout), _samples(tmp_path / "plain", holdout)
        assert sorted(mixed) == ordered and mixed != ordered
    assert manifest.shuffled and len(manifest.shards) > 1


def corpus_source(path: Path):
    from distil.data_pipeline.prepare.corpus import resolve_sources

    (source,) = resolve_sources([str(path)], exclude=path.parent / "none")
    return source


@pytest.mark.slow
def test_worker_count_does_not_change_the_shuffled_shards(tmp_path, corpus, tokenizer_dir):
    for workers in (1, 2):
        stage.prepare(_config(corpus, tmp_path / f"w{workers}", tokenizer_dir, workers=workers))
    assert all_file_bytes(tmp_path / "w1") == all_file_bytes(tmp_path / "w2")


def _members(lengths: list[int], first: int) -> Members:
    return Members.build([(f"{first + i:010d}", npy_bytes(np.full(n, i % 7, dtype=np.uint16)), n)
                          for i, n in enumerate(lengths)])


class _RecordingWriter(ShardSetWriter):
    def __init__(self, folder: Path) -> None:
        super().__init__(folder, "train", 1 << 30)
        self.calls: list[int] = []

    def write(self, members: Members) -> None:
        self.calls.append(len(members.data))
        super().write(members)


def _shuffle_through(folder: Path, batches: list[list[int]], expected_bytes: int, bucket_bytes: int, seed: int = 0):
    writer = _RecordingWriter(folder)
    shuffle = ExternalShuffle(folder / ".work", "train", seed, 0, expected_bytes, bucket_bytes)
    first = 0
    for lengths in batches:
        shuffle.add(_members(lengths, first))
        first += len(lengths)
    shuffle.drain(writer)
    writer.close()
    assert not (folder / ".work" / "train").exists()
    samples = read_split_file(folder / "train-000000.tar")
    return samples, writer.calls


def read_split_file(path: Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]


def read_shard(path: Path) -> list[np.ndarray]:
    return [s[SAMPLE_KEY] for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode()]


@pytest.mark.parametrize("expected_bytes", [10**7, 1])  # many buckets from the start / one bucket split later
def test_buckets_stay_within_the_memory_bound(tmp_path, expected_bytes):
    rng = np.random.default_rng(0)
    batches = [rng.integers(1, 300, size=int(rng.integers(0, 60))).tolist() for _ in range(40)]
    count = sum(map(len, batches))
    bucket_bytes = 30_000
    keys, calls = _shuffle_through(tmp_path / "a", batches, expected_bytes, bucket_bytes)
    assert sorted(keys) == [f"{i:010d}" for i in range(count)] and keys != sorted(keys)
    assert len(calls) > 5 and max(calls) <= 2 * bucket_bytes  # one bucket at a time, none oversized
    again, _ = _shuffle_through(tmp_path / "b", batches, expected_bytes, bucket_bytes)
    other, _ = _shuffle_through(tmp_path / "c", batches, expected_bytes, bucket_bytes, seed=5)
    assert again == keys and other != keys and sorted(other) == sorted(keys)


def test_shuffle_position_is_close_to_uniform(tmp_path):
    """Where the first 100 samples end up, over a 2000-sample split in 8 buckets: spread over the output."""
    keys, _ = _shuffle_through(tmp_path, [[20] * 500] * 4, expected_bytes=8 * 300_000, bucket_bytes=300_000)
    positions = np.array([i for i, key in enumerate(keys) if int(key) < 100])
    counts = np.bincount(positions * 10 // len(keys), minlength=10)
    assert counts.min() >= 2 and counts.max() <= 22, counts  # ~10 per tenth expected


def test_interrupted_shuffled_run_leaves_no_shard_set(tmp_path, corpus, tokenizer_dir, monkeypatch):
    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardSetWriter, "write", stop)  # first called while draining the buckets
    with pytest.raises(KeyboardInterrupt):
        stage.prepare(_config(corpus, tmp_path / "out", tokenizer_dir))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_manifests_from_before_the_shuffle_still_load(tmp_path, corpus, tokenizer_dir):
    _prepare(corpus, tmp_path / "out", tokenizer_dir)
    path = tmp_path / "out" / MANIFEST_NAME
    data = json.loads(path.read_text())
    assert data["shuffled"] is True and data["seed"] == 0
    del data["shuffled"], data["seed"]
    path.write_text(json.dumps(data))
    manifest, _ = load_manifest(tmp_path / "out")
    assert manifest.shuffled is False and manifest.seed is None
