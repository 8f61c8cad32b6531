"""A seeded global shuffle of one split's samples before they go to the shards: a two-pass external shuffle.

The original recipe shuffles the whole binarized corpus once, so sequences of one document or book do not
land in the same batches; the streaming loader only mixes within a shuffle buffer. A corpus does not fit
in memory, so the shuffle goes through disk:

1. `add`: each finished tar member goes to one of B bucket files, chosen by splitmix64 of (seed, split,
   index of the sample in the split). Members are buffered per bucket and appended in blocks.
2. `drain`: one bucket at a time is loaded, put in the order of a permutation seeded by (seed, split,
   bucket) and handed to the shard writer; its files are deleted as soon as it is written.

Assigning every sample independently and uniformly to a bucket and permuting each bucket uniformly gives a
uniformly random order of the whole split. B is chosen from an estimate of the split's size so that a bucket
holds about `bucket_bytes`; a bucket that still comes out larger than twice that (the estimate was low) is
split the same way into smaller ones before it is loaded, so memory stays bounded whatever the estimate:
at most one bucket (<= 2 x `bucket_bytes`) plus the bucket buffers (`BUFFER_BYTES`) of the first pass.
Everything depends only on the samples, their order and the seed: the same input gives the same shards.
Disk: the split is held once in buckets, then moves bucket by bucket into shards (peak about the output
size plus one bucket).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from distil.common.hashing import splitmix64
from distil.data_pipeline.prepare.shards import Members, ShardSetWriter

BUCKET_BYTES = 256 << 20  # a bucket is loaded whole (and copied once in its new order)
MAX_BUCKETS = 4096
BUFFER_BYTES = 64 << 20  # all bucket buffers of one shuffle together, before they are appended to files
_MIN_FLUSH_BYTES = 64 << 10
_INDEX_ROW_BYTES = 16  # int64 member size + int64 tokens
_MAX_SPLIT_DEPTH = 8
_WRITE_SAMPLES = 8192  # a loaded bucket goes to the shard writer in pieces of this many samples
_SPLIT_SALT = 0x5EED5EED  # set apart from the held-out choice's hash
_PERMUTE, _SPLIT = 0, 1  # what a bucket's generator is for


def bucket_count(expected_bytes: int, bucket_bytes: int = BUCKET_BYTES) -> int:
    return max(1, min(MAX_BUCKETS, math.ceil(expected_bytes / bucket_bytes)))


class _Buckets:
    """B bucket files (`{name}.data`: member bytes, `{name}.index`: int64 pairs of member size and tokens),
    appended to through per-bucket buffers."""

    def __init__(self, folder: Path, prefix: str, count: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"{prefix}-{b:05d}" for b in range(count)]
        self._data: list[list[bytes]] = [[] for _ in range(count)]
        self._index: list[list[np.ndarray]] = [[] for _ in range(count)]
        self._buffered = [0] * count
        self._flush_bytes = max(_MIN_FLUSH_BYTES, BUFFER_BYTES // count)

    def append(self, bucket: int, data: bytes, index: np.ndarray) -> None:
        self._data[bucket].append(data)
        self._index[bucket].append(index)
        self._buffered[bucket] += len(data)
        if self._buffered[bucket] >= self._flush_bytes:
            self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        if not self._data[bucket]:
            return
        path = self.paths[bucket]
        with open(_data_file(path), "ab") as f:
            f.writelines(self._data[bucket])
        with open(_index_file(path), "ab") as f:
            f.writelines(i.tobytes() for i in self._index[bucket])
        self._data[bucket], self._index[bucket], self._buffered[bucket] = [], [], 0

    def close(self) -> None:
        for bucket in range(len(self.paths)):
            self._flush(bucket)


def _data_file(bucket: Path) -> Path:
    return bucket.with_name(bucket.name + ".data")


def _index_file(bucket: Path) -> Path:
    return bucket.with_name(bucket.name + ".index")


def _scatter(members: Members, buckets: np.ndarray, target: _Buckets) -> None:
    """Appends member i of `members` to bucket `buckets[i]`, keeping their order within a bucket."""
    sizes = np.asarray(members.sizes, dtype=np.int64)
    index = np.stack([sizes, np.asarray(members.tokens, dtype=np.int64)], axis=1)
    starts = (np.cumsum(sizes) - sizes).tolist()
    ends = np.cumsum(sizes).tolist()
    order = np.argsort(buckets, kind="stable")
    sorted_buckets = buckets[order]
    cuts = np.flatnonzero(np.diff(sorted_buckets)) + 1
    view = memoryview(members.data)
    for group in np.split(order, cuts):
        positions = group.tolist()
        data = b"".join([view[starts[i] : ends[i]] for i in positions])
        target.append(int(buckets[group[0]]), data, index[group])


class ExternalShuffle:
    """Takes a split's members in corpus order (`add`), writes them to a shard writer shuffled (`drain`)."""

    def __init__(
        self,
        folder: Path,
        name: str,
        seed: int,
        split: int,
        expected_bytes: int,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        self.folder = folder / name
        self.seed = seed
        self.split = split
        self.bucket_bytes = bucket_bytes
        self.samples = 0
        self._buckets = _Buckets(self.folder, "bucket", bucket_count(expected_bytes, bucket_bytes))
        self._key = (seed * 0x100000001B3 + split * 0x1000193 + _SPLIT_SALT) % (1 << 64)

    def add(self, members: Members) -> None:
        count = len(members.sizes)
        if not count:
            return
        buckets = len(self._buckets.paths)
        if buckets == 1:
            index = np.stack(
                [np.asarray(members.sizes, np.int64), np.asarray(members.tokens, np.int64)], axis=1
            )
            self._buckets.append(0, members.data, index)
        else:
            hashed = splitmix64(self._key, np.arange(self.samples, self.samples + count, dtype=np.uint64))
            _scatter(members, (hashed % np.uint64(buckets)).astype(np.int64), self._buckets)
        self.samples += count

    def drain(self, writer: ShardSetWriter) -> None:
        """Writes every sample to `writer` in the shuffled order, then removes the bucket files."""
        self._buckets.close()
        for number, path in enumerate(self._buckets.paths):
            self._emit(path, (number,), writer)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _rng(self, purpose: int, where: tuple[int, ...]) -> np.random.Generator:
        return np.random.default_rng([self.seed % (1 << 64), self.split, purpose, len(where), *where])

    def _emit(self, path: Path, where: tuple[int, ...], writer: ShardSetWriter) -> None:
        data_path, index_path = _data_file(path), _index_file(path)
        if not data_path.exists():
            return  # no sample chose this bucket
        size = data_path.stat().st_size
        several = index_path.stat().st_size > _INDEX_ROW_BYTES  # a lone (huge) sample cannot be split further
        if size > 2 * self.bucket_bytes and several and len(where) < _MAX_SPLIT_DEPTH:
            self._split_bucket(path, where, math.ceil(size / self.bucket_bytes), writer)
            return
        index = np.fromfile(index_path, dtype=np.int64).reshape(-1, 2)
        data = memoryview(data_path.read_bytes())
        ends = np.cumsum(index[:, 0])
        starts, ends = (ends - index[:, 0]).tolist(), ends.tolist()
        order = self._rng(_PERMUTE, where).permutation(len(index))
        for first in range(0, len(order), _WRITE_SAMPLES):  # in pieces: no second copy of the whole bucket
            part = order[first : first + _WRITE_SAMPLES]
            writer.write(
                Members(
                    b"".join([data[starts[i] : ends[i]] for i in part.tolist()]),
                    index[part, 0].tolist(),
                    index[part, 1].tolist(),
                )
            )
        del data
        data_path.unlink()
        index_path.unlink()

    def _split_bucket(self, path: Path, where: tuple[int, ...], parts: int, writer: ShardSetWriter) -> None:
        """Re-buckets an oversized bucket into `parts` smaller ones, reading it in pieces, then emits them."""
        data_path, index_path = _data_file(path), _index_file(path)
        index = np.fromfile(index_path, dtype=np.int64).reshape(-1, 2)
        choice = self._rng(_SPLIT, where).integers(0, parts, size=len(index))
        sub = _Buckets(path.parent, f"{path.name}_{len(where)}", parts)
        ends = np.cumsum(index[:, 0])
        first = 0
        with open(data_path, "rb") as f:
            while first < len(index):
                done = int(ends[first - 1]) if first else 0
                last = max(first + 1, int(np.searchsorted(ends, done + self.bucket_bytes, side="right")))
                piece = Members(
                    f.read(int(ends[last - 1]) - done),
                    index[first:last, 0].tolist(),
                    index[first:last, 1].tolist(),
                )
                _scatter(piece, choice[first:last], sub)
                first = last
        sub.close()
        data_path.unlink()
        index_path.unlink()
        for number, sub_path in enumerate(sub.paths):
            self._emit(sub_path, (*where, number), writer)
