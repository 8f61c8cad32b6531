"""The streaming loader: webdataset shards -> per-rank, length-grouped, dynamically masked batches.

How an epoch is laid out (everything below is a pure function of the manifest's sample counts and
(seed, epoch, rank, world_size), so every rank can compute it, before reading a byte):

1. Shard order: the split's shards permuted by (seed, epoch) -- the same on every rank -- and read as
   one sequence of N samples.
2. Ranks: rank r takes positions [r*n, (r+1)*n) of that sequence, n = ceil(N / world_size), wrapping
   around at N (so a few samples repeat when N is not a multiple of world_size). Splitting at sample
   granularity, not by whole shards, gives every rank the same number of samples whatever the shard
   counts, hence the same number of batches: no rank waits on a collective forever.
3. Partitions: a rank's range is cut into `partitions` contiguous parts (by default one per DataLoader
   worker), each read sequentially by its own tar reader. Worker w serves the partitions p with
   p % num_workers == w, so no worker reads another's data. A partition that starts inside a shard reads
   past that shard's first samples, so more partitions cost more reading. The batch sequence depends on
   `partitions`, not on num_workers: a resumed stream keeps the saved partition count (unless one is
   passed explicitly), so a run can resume with another number of workers.
4. Chunks: each partition is cut into chunks of `shuffle_buffer` samples (rounded up to a multiple of
   batch_size). A chunk is read whole, then shuffled and grouped by length into batches (batching.py),
   seeded by (seed, epoch, rank, chunk): the shuffle buffer. Chunks are emitted round-robin over the
   partitions: chunk 0 of every partition, then chunk 1, ...; the main process puts the workers' output
   back in this order, so the batch sequence does not depend on num_workers.
5. Masking: a chunk's batches are masked MASK_GROUP at a time (Masker.mask_batches: one set of tensor
   ops, each batch still gets its own ceil(rate x its tokens) positions) with a generator seeded by
   (seed, epoch, rank, chunk, group), so a sequence gets a fresh mask every epoch and a resumed run,
   which rebuilds the chunk, draws exactly the masks it would have drawn.

The position in the stream is (epoch, chunk index, batches already taken from that chunk): state_dict()
is that, and a resumed stream re-reads the current chunk and skips the batches already taken.

batches_per_epoch() is exact with batch_size (sum over chunks of ceil(chunk / batch_size)). With a
token budget (max_tokens) the count depends on lengths nobody knows up front, so it is estimated from
the manifest's token counts and every rank yields exactly that many: when a rank's data runs out early it
starts another pass over its own range (fresh shuffle and masks); when data is left at the end it waits
for the next epoch. Corrupt data that shrinks a rank's batches is made up the same way.

Corrupt input (a truncated tar, an undecodable or out-of-range sample) is skipped and counted in
stats(); the positions it should have held stay empty, so resuming stays exact. Samples are decoded only
from .npy with pickling disabled (see load_npy): shards are data, never code.

`shards` may be a folder or manifest.json path, an http(s) URL of either, or a `pipe:` command with a
`{path}` placeholder, e.g. `pipe:aws s3 cp s3://bucket/wiki/{path} -`: it is run with {path} set to
manifest.json, token_counts.npy and each shard's relative path, and must write that file to stdout.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distil.common.errors import UserError
from distil.common.hashing import mix_seed
from distil.data_pipeline.batching import (
    fixed_size_batches,
    pad_sequences,
    padded_length,
    token_budget_batches,
)
from distil.data_pipeline.manifest import (
    MANIFEST_NAME,
    SAMPLE_KEY,
    TOKEN_COUNTS_NAME,
    Manifest,
    ShardInfo,
    load_manifest,
    shard_url,
)
from distil.data_pipeline.masking import Masker, MaskingConfig, unmasked_labels

log = logging.getLogger(__name__)

STATE_VERSION = 1
MASK_GROUP = 64  # batches masked together (Masker.mask_batches)
PIPE_PLACEHOLDER = "{path}"
_GROUPING, _MASKING, _SHARD_ORDER = 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# Where the shard set lives


@dataclass
class ShardSet:
    manifest: Manifest
    location: str  # what the user passed
    base: str  # folder / URL prefix the manifest's relative paths hang off ("" for pipe: sets)
    pipe_command: str | None = None  # `pipe:...{path}...` template, for pipe: shard sets

    def url(self, relative_path: str) -> str:
        if self.pipe_command is not None:
            return self.pipe_command.replace(PIPE_PLACEHOLDER, relative_path)
        return shard_url(self.base, ShardInfo(path=relative_path, samples=0, tokens=0))

    def read_url(self, relative_path: str) -> str:
        """What webdataset opens to stream a shard. http(s) goes through curl, as webdataset's own opener
        does, plus a stall limit (under 1 kB/s for 60 s aborts the shard), so a server that stops
        answering costs a skipped shard instead of a hung rank."""
        url = self.url(relative_path)
        if url.startswith(("http://", "https://")):
            if shutil.which("curl") is None:
                raise UserError(f"shards at {self.location} are streamed with curl: install curl")
            return (
                "pipe:curl -f -s -L --connect-timeout 30 --retry 5 --retry-delay 2 "
                f"--speed-limit 1024 --speed-time 60 {shlex.quote(url)}"
            )
        return url

    def shards(self, split: str) -> list[ShardInfo]:
        if split == "train":
            return self.manifest.shards
        if split == "holdout":
            if not self.manifest.holdout_shards:
                raise UserError(
                    f"{self.location} has no held-out shards: re-run `distil prepare` with --holdout-fraction"
                )
            return self.manifest.holdout_shards
        raise UserError(f"unknown split {split!r}: use 'train' or 'holdout'")

    def read_file(self, relative_path: str) -> bytes:
        """Reads a small side file of the set (token_counts.npy, manifest.json, tokenizer files)."""
        return read_location(self.url(relative_path), self.location)


def read_location(url: str, shard_set: str) -> bytes:
    """The bytes at a local path, an http(s) URL or the stdout of a `pipe:` command."""
    try:
        if url.startswith("pipe:"):
            return _run_pipe(url[len("pipe:") :])
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - user-given shard URL
                return r.read()
        return Path(url).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{url} is missing: the shard set at {shard_set} is incomplete") from None
    except (OSError, urllib.error.URLError) as e:
        raise UserError(f"cannot read {url}: {e}") from None


def _run_pipe(command: str) -> bytes:
    try:
        result = subprocess.run(command, shell=True, capture_output=True, timeout=600)  # noqa: S602
    except subprocess.TimeoutExpired:
        raise UserError(f"`{command}` did not finish within 600 s: check the command and the store") from None
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UserError(f"`{command}` failed (exit {result.returncode}): {err[-1] if err else 'no message'}")
    return result.stdout


def open_shard_set(shards: str) -> ShardSet:
    """Resolves a folder / manifest path / http(s) URL / `pipe:` command template to its manifest."""
    location = str(shards)
    if location.startswith("pipe:"):
        if PIPE_PLACEHOLDER not in location:
            raise UserError(
                f"pipe: shard location {location!r} needs a {PIPE_PLACEHOLDER} placeholder for the file it "
                "should print, e.g. 'pipe:aws s3 cp s3://bucket/set/{path} -'"
            )
        raw = read_location(location.replace(PIPE_PLACEHOLDER, MANIFEST_NAME), location)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{location}: the manifest it printed is not valid JSON ({e})") from None
        return ShardSet(Manifest.from_dict(data, where=location), location, base="", pipe_command=location)
    manifest, base = load_manifest(location)
    return ShardSet(manifest=manifest, location=location, base=base)


def load_token_counts(shard_set: ShardSet) -> np.ndarray:
    raw = shard_set.read_file(TOKEN_COUNTS_NAME)
    try:
        counts = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(
            f"{shard_set.url(TOKEN_COUNTS_NAME)} is not a valid .npy array ({e}); re-run `distil prepare`"
        ) from None
    if counts.ndim != 1:
        raise UserError(f"{shard_set.url(TOKEN_COUNTS_NAME)} must be a 1-D array of counts per vocab id")
    return counts


def check_shards_exist(shard_set: ShardSet, shards: list[ShardInfo]) -> None:
    """A missing shard is a clear error at start, not a silent gap mid-epoch (pipe: sets cannot be checked)."""
    for shard in shards:
        url = shard_set.url(shard.path)
        if url.startswith("pipe:"):
            return
        if url.startswith(("http://", "https://")):
            request = urllib.request.Request(url, method="HEAD")
            try:
                with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - user-given shard URL
                    pass
            except urllib.error.HTTPError as e:
                raise UserError(
                    f"shard {url} is not served (HTTP {e.code}): the shard set is incomplete"
                ) from None
            except (OSError, urllib.error.URLError) as e:
                raise UserError(f"cannot reach shard {url}: {e}") from None
        elif not Path(url).is_file():
            raise UserError(
                f"shard {url} listed in the manifest is missing: copy the whole shard set or re-run `distil prepare`"
            )


# ----------------------------------------------------------------------------------------------------
# The epoch plan: who reads which samples, in which chunks


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the rank's chunk sequence (counts across passes)
    pass_: int  # 0 for the first pass over the rank's range, 1+ when the range is read again
    partition: int
    number: int  # chunk number within its partition
    start: int  # rank-range positions [start, stop)
    stop: int


class EpochPlan:
    """The split of one epoch into ranks, partitions and chunks (see the module docstring)."""

    def __init__(
        self,
        shard_samples: list[int],
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        partitions: int,
        chunk_size: int,
    ) -> None:
        self.total = sum(shard_samples)
        order = np.random.default_rng([seed, epoch, _SHARD_ORDER]).permutation(len(shard_samples))
        self.shard_order = [int(i) for i in order]
        counts = np.array([shard_samples[i] for i in self.shard_order], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])  # in epoch order
        self.per_rank = -(-self.total // world_size)
        self.rank_start = rank * self.per_rank
        bounds = [self.per_rank * p // partitions for p in range(partitions + 1)]
        self.partition_ranges = [(bounds[p], bounds[p + 1]) for p in range(partitions)]
        self.chunk_size = chunk_size
        self._one_pass = self._pass_layout()

    def _pass_layout(self) -> list[tuple[int, int, int, int]]:
        chunks_per_partition = [-(-(b - a) // self.chunk_size) for a, b in self.partition_ranges]
        layout = []
        for number in range(max(chunks_per_partition, default=0)):
            for p, (a, b) in enumerate(self.partition_ranges):
                if number < chunks_per_partition[p]:
                    start = a + number * self.chunk_size
                    layout.append((p, number, start, min(start + self.chunk_size, b)))
        return layout

    @property
    def chunks_per_pass(self) -> int:
        return len(self._one_pass)

    def chunk(self, index: int) -> Chunk:
        pass_, i = divmod(index, self.chunks_per_pass)
        p, number, start, stop = self._one_pass[i]
        return Chunk(index, pass_, p, number, start, stop)

    def nonempty_partitions(self) -> set[int]:
        return {p for p, _, _, _ in self._one_pass}

    def chunk_lengths(self) -> list[int]:
        return [stop - start for _, _, start, stop in self._one_pass]

    def locate(self, rank_position: int) -> tuple[int, int]:
        """(index into shard_order, sample offset in that shard) of a rank-range position."""
        q = (self.rank_start + rank_position) % self.total
        k = int(np.searchsorted(self.shard_starts, q, side="right")) - 1
        return k, q - int(self.shard_starts[k])


# ----------------------------------------------------------------------------------------------------
# Reading samples


@dataclass
class ChunkStats:
    skipped_samples: int = 0
    skipped_shards: int = 0


class _ShardReader:
    """Sequential reader of one shard (a webdataset.WebDataset over that single URL) with forward seeks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.next_index = 0  # index of the sample the iterator yields next
        self.failed_at: int | None = None  # sample index where reading broke off early
        dataset = wds.WebDataset(
            [url],
            handler=self._on_error,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
        )
        self._samples = iter(dataset)

    def _on_error(self, exn: BaseException) -> bool:
        log.warning("shard %s: %s (skipping what cannot be read)", self.url, exn)
        return True  # keep going: webdataset moves past what it can

    def take(self, index: int) -> dict[str, Any] | None:
        """The raw sample at `index` (>= next_index), or None if the shard cannot deliver it."""
        while self.failed_at is None and self.next_index <= index:
            try:
                sample = next(self._samples)
            except StopIteration:
                sample = None
            if sample is None:
                self.failed_at = self.next_index
                break
            self.next_index += 1
            if self.next_index - 1 == index:
                return sample
        return None

    def close(self) -> None:
        close = getattr(self._samples, "close", None)
        if close is not None:
            close()


class PartitionReader:
    """Reads rank-range positions of one partition in increasing order, keeping one shard open."""

    def __init__(self, plan: EpochPlan, urls: list[str]) -> None:
        self.plan = plan
        self.urls = urls  # in manifest order
        self._open: tuple[int, _ShardReader] | None = None

    def read(self, start: int, stop: int, stats: ChunkStats) -> list[tuple[int, dict[str, Any] | None]]:
        """[(position, raw sample or None)] for positions [start, stop)."""
        out = []
        for position in range(start, stop):
            k, offset = self.plan.locate(position)
            reader = self._reader_for(k, offset)
            sample = reader.take(offset)
            if sample is None:
                stats.skipped_samples += 1
                # A shard that breaks off counts once, in the chunk holding its first missing sample.
                if reader.failed_at == offset:
                    stats.skipped_shards += 1
            out.append((position, sample))
        return out

    def _reader_for(self, k: int, offset: int) -> _ShardReader:
        if self._open is not None:
            open_k, reader = self._open
            if open_k == k and reader.next_index <= offset:
                return reader
            reader.close()
        reader = _ShardReader(self.urls[self.plan.shard_order[k]])
        self._open = (k, reader)
        return reader

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<|][iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \}\s*"
)


def load_npy(data: bytes) -> np.ndarray:
    """A 1-D integer .npy: its header read directly (np.save's exact form), else np.load(allow_pickle=False).

    np.load parses every header with ast.literal_eval, about 100 us a sample, a third of the loader's
    budget; np.save writes 1-D integer arrays with one fixed header form, matched here. Anything else
    (other versions, dtypes, shapes) goes through np.load with pickling disabled.
    """
    if data[:8] == _NPY_MAGIC and len(data) >= 10:
        header_len = int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data, 10, 10 + header_len)
        if match is not None:
            count = int(match.group(2))
            offset = 10 + header_len
            dtype = np.dtype(match.group(1).decode())
            if len(data) - offset == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(sample: dict[str, Any] | None, vocab_size: int, max_len: int) -> np.ndarray | None:
    """Token ids of a raw sample, or None when it is missing, undecodable or out of range."""
    if sample is None or SAMPLE_KEY not in sample:
        return None
    try:
        ids = load_npy(sample[SAMPLE_KEY])
    except (ValueError, OSError, EOFError):
        return None
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or not 2 <= ids.shape[0] <= max_len:
        return None
    if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        return None
    return ids


# ----------------------------------------------------------------------------------------------------
# Producing batches (runs in DataLoader workers, or in the main process with num_workers=0)


@dataclass
class BatchingConfig:
    batch_size: int | None
    max_tokens: int | None
    group_by_size: bool
    pad_multiple: int
    chunk_size: int


@dataclass
class _Item:
    """What a worker sends: a batch of chunk `chunk`, or (batch is None) the end of that chunk."""

    chunk: int
    index: int  # batch index within the chunk; for an end marker: the chunk's batch count
    batch: dict[str, torch.Tensor] | None
    stats: ChunkStats | None  # the chunk's read stats, sent once (first batch, or the end if it has none)


class _ChunkProducer(IterableDataset):
    def __init__(
        self,
        plan: EpochPlan,
        urls: list[str],
        *,
        first_chunk: int,
        skip_batches: int,
        key: tuple[int, int, int],  # (seed, epoch, rank)
        batching: BatchingConfig,
        masker: Masker | None,
        pad_id: int,
        vocab_size: int,
        max_len: int,
    ) -> None:
        self.plan, self.urls = plan, urls
        self.first_chunk, self.skip_batches = first_chunk, skip_batches
        self.key, self.batching, self.masker = key, batching, masker
        self.pad_id, self.vocab_size, self.max_len = pad_id, vocab_size, max_len

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if not any(p % workers == worker for p in self.plan.nonempty_partitions()):
            return  # more workers than partitions with data: this one has nothing to do
        readers: dict[int, PartitionReader] = {}
        try:
            index = self.first_chunk
            while True:
                chunk = self.plan.chunk(index)
                if chunk.partition % workers == worker:
                    if chunk.partition not in readers:
                        readers[chunk.partition] = PartitionReader(self.plan, self.urls)
                    skip = self.skip_batches if index == self.first_chunk else 0
                    yield from self._chunk_items(chunk, readers[chunk.partition], skip)
                index += 1
        finally:
            for reader in readers.values():
                reader.close()

    def _chunk_items(self, chunk: Chunk, reader: PartitionReader, skip: int) -> Iterator[_Item]:
        stats = ChunkStats()
        seqs = []
        for _, raw in reader.read(chunk.start, chunk.stop, stats):
            ids = decode_sample(raw, self.vocab_size, self.max_len)
            if ids is None:
                if raw is not None:
                    stats.skipped_samples += 1
                continue
            seqs.append(ids)
        chunk_key = [*self.key, chunk.pass_, chunk.partition, chunk.number]
        groups = self._group(seqs, np.random.default_rng([*chunk_key, _GROUPING]))
        # Batches are built and masked MASK_GROUP at a time, each group from its own seed: memory stays
        # bounded for large shuffle buffers, and a resumed chunk skips whole groups without masking them.
        for first in range(skip - skip % MASK_GROUP, len(groups), MASK_GROUP):
            seed = mix_seed([*chunk_key, first, _MASKING])
            batches = self._make_batches(seqs, groups[first : first + MASK_GROUP], seed)
            for j, batch in enumerate(batches, start=first):
                if j >= skip:
                    yield _Item(chunk.index, j, batch, stats if j == 0 else None)
        yield _Item(chunk.index, len(groups), None, stats if not groups and skip == 0 else None)

    def _group(self, seqs: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        if not seqs:
            return []
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        b = self.batching
        if b.max_tokens is not None:
            return token_budget_batches(
                lengths, b.max_tokens, rng, max_len=self.max_len, pad_multiple=b.pad_multiple
            )
        return fixed_size_batches(
            lengths, b.batch_size, rng, max_len=self.max_len, group_by_size=b.group_by_size
        )

    def _make_batches(
        self, seqs: list[np.ndarray], groups: list[np.ndarray], mask_seed: int
    ) -> list[dict[str, torch.Tensor]]:
        """Pads batches and masks them all at once from one seeded generator."""
        padded = []
        for group in groups:
            ids, attention = pad_sequences([seqs[i] for i in group], self.pad_id, self.batching.pad_multiple)
            padded.append((torch.from_numpy(ids), torch.from_numpy(attention)))
        if self.masker is None:
            return [
                {"input_ids": ids, "attention_mask": att, "labels": unmasked_labels(ids, att)}
                for ids, att in padded
            ]
        if not padded:
            return []
        masked = self.masker.mask_batches(padded, torch.Generator().manual_seed(mask_seed))
        return [
            {"input_ids": m_ids, "attention_mask": att, "labels": labels}
            for (_, att), (m_ids, labels) in zip(padded, masked, strict=True)
        ]


# ----------------------------------------------------------------------------------------------------
# The public stream


@dataclass
class StreamStats:
    samples: int = 0
    tokens: int = 0
    batches: int = 0
    skipped_samples: int = 0
    skipped_shards: int = 0
    extra_passes: int = 0  # times a rank re-read its range to fill its batch count (max_tokens, corruption)

    def add_chunk(self, chunk: ChunkStats) -> None:
        self.skipped_samples += chunk.skipped_samples
        self.skipped_shards += chunk.skipped_shards


@dataclass
class _Position:
    epoch: int = 0
    chunk: int = 0
    batch_in_chunk: int = 0
    batches: int = 0  # batches yielded in this epoch
    pass_batches: dict[int, int] = field(default_factory=dict)  # batches yielded per pass (hang guard)


class PretrainStream:
    """Per-rank stream of {input_ids, attention_mask, labels} batches over a shard set (see module docstring).

    Iterate once per epoch: `for epoch ...: stream.set_epoch(epoch); for batch in stream: ...`. Iterating
    yields the rest of the current epoch, from the current position, so a stream restored with
    load_state_dict() continues exactly where the saved one stopped.
    """

    def __init__(
        self,
        shards: str,
        *,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        group_by_size: bool = True,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        masking: MaskingConfig | None = MaskingConfig(),  # noqa: B008 - a frozen default, never mutated
        pad_multiple: int = 8,
        partitions: int | None = None,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        check_shards: bool = True,
    ) -> None:
        if (batch_size is None) == (max_tokens is None):
            raise UserError("give the loader exactly one of batch_size or max_tokens")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise UserError(f"seed {seed} must be >= 0")
        if num_workers < 0 or shuffle_buffer < 1 or pad_multiple < 1:
            raise UserError("num_workers must be >= 0, shuffle_buffer and pad_multiple >= 1")
        self.shard_set = open_shard_set(shards)
        self.manifest: Manifest = self.shard_set.manifest
        self.split = split
        self._shards = [s for s in self.shard_set.shards(split) if s.samples > 0]
        if not self._shards:
            raise UserError(f"the {split} split of {shards} holds no samples: re-run `distil prepare`")
        if check_shards:
            check_shards_exist(self.shard_set, self._shards)
        max_len = self.manifest.max_len
        if max_tokens is not None and max_tokens < padded_length(max_len, pad_multiple):
            raise UserError(
                f"max_tokens {max_tokens} cannot hold one sequence of max_len {max_len}: "
                f"use at least {padded_length(max_len, pad_multiple)}"
            )
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self._partitions_given = partitions is not None
        self.partitions = partitions if partitions is not None else max(1, num_workers)
        chunk_size = shuffle_buffer if batch_size is None else -(-shuffle_buffer // batch_size) * batch_size
        self.batching = BatchingConfig(batch_size, max_tokens, group_by_size, pad_multiple, chunk_size)
        self.masking = masking
        self.token_counts: np.ndarray | None = None
        self.masker: Masker | None = None
        if masking is not None:
            self.token_counts = load_token_counts(self.shard_set)
            special = self.manifest.special_tokens
            self.masker = Masker(
                masking, self.token_counts, special.ids(), special.mask, self.manifest.vocab_size
            )
        self._urls = [self.shard_set.read_url(s.path) for s in self._shards]
        self._position = _Position()
        self._stats = StreamStats()
        self._plan_cache: tuple[int, EpochPlan] | None = None

    # -- epoch layout ---------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            plan = EpochPlan(
                [s.samples for s in self._shards],
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                partitions=self.partitions,
                chunk_size=self.batching.chunk_size,
            )
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def batches_per_epoch(self) -> int:
        """The same on every rank; exact with batch_size, an estimate every rank sticks to with max_tokens."""
        plan = self._plan(self._position.epoch)
        b = self.batching
        if b.batch_size is not None:
            return sum(-(-n // b.batch_size) for n in plan.chunk_lengths())
        tokens = sum(s.tokens for s in self._shards)
        mean_len = tokens / sum(s.samples for s in self._shards)
        # Per chunk: its padded tokens over the budget a batch really fills (it closes about half a
        # sequence short), plus half a batch for the chunk's last, partly filled one.
        usable = b.max_tokens - mean_len / 2
        per_sample = mean_len + b.pad_multiple / 2
        return max(1, sum(math.floor(n * per_sample / usable + 1.0) for n in plan.chunk_lengths()))

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`; the epoch already current keeps its position (safe after a resume)."""
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        if epoch != self._position.epoch:
            self._position = _Position(epoch=epoch)

    def rewind(self) -> None:
        """Back to the start of the current epoch (e.g. to evaluate on the same held-out batches again)."""
        self._position = _Position(epoch=self._position.epoch)

    @property
    def epoch(self) -> int:
        return self._position.epoch

    # -- iteration ------------------------------------------------------------------------------------

    def _producer(self) -> _ChunkProducer:
        pos = self._position
        special = self.manifest.special_tokens
        return _ChunkProducer(
            self._plan(pos.epoch),
            self._urls,
            first_chunk=pos.chunk,
            skip_batches=pos.batch_in_chunk,
            key=(self.seed, pos.epoch, self.rank),
            batching=self.batching,
            masker=self.masker,
            pad_id=special.pad,
            vocab_size=self.manifest.vocab_size,
            max_len=self.manifest.max_len,
        )

    def _items(self) -> Iterator[_Item]:
        producer = self._producer()
        if self.num_workers == 0:
            return iter(producer)
        loader = DataLoader(
            producer,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        total = self.batches_per_epoch()
        if self._position.batches >= total:
            return
        plan = self._plan(self._position.epoch)
        items = self._items()
        pending: dict[int, deque[_Item]] = defaultdict(deque)
        try:
            while self._position.batches < total:
                item = self._next_in_order(items, pending)
                pos = self._position
                if item.stats is not None:
                    self._stats.add_chunk(item.stats)
                if item.batch is None:
                    self._finish_chunk(plan, pos)
                    continue
                pos.batch_in_chunk = item.index + 1
                pos.batches += 1
                pass_ = pos.chunk // plan.chunks_per_pass
                pos.pass_batches[pass_] = pos.pass_batches.get(pass_, 0) + 1
                batch = item.batch
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self._stats.batches += 1
                self._stats.samples += int(batch["attention_mask"].shape[0])
                self._stats.tokens += int(batch["attention_mask"].sum())
                yield batch
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            del items

    def _next_in_order(self, items: Iterator[_Item], pending: dict[int, deque[_Item]]) -> _Item:
        want = self._position.chunk
        while not pending[want]:
            item = next(items)
            pending[item.chunk].append(item)
        item = pending[want].popleft()
        if not pending[want]:
            del pending[want]
        return item

    def _finish_chunk(self, plan: EpochPlan, pos: _Position) -> None:
        next_chunk = pos.chunk + 1
        if next_chunk % plan.chunks_per_pass == 0:  # a whole pass over the rank's range is done
            done_pass = pos.chunk // plan.chunks_per_pass
            if pos.pass_batches.get(done_pass, 0) == 0:
                raise UserError(
                    f"rank {self.rank} read a whole pass over its part of {self.shard_set.location} and found "
                    "no readable sample: the shards are corrupt; re-run `distil prepare`"
                )
            self._stats.extra_passes += 1
        pos.chunk, pos.batch_in_chunk = next_chunk, 0

    # -- state ----------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "partitions": self.partitions,
            "samples": sum(s.samples for s in self._shards),
            "shards": len(self._shards),
            "batching": asdict(self.batching),
        }

    def state_dict(self) -> dict[str, Any]:
        pos = self._position
        return {
            "version": STATE_VERSION,
            "epoch": pos.epoch,
            "chunk": pos.chunk,
            "batch_in_chunk": pos.batch_in_chunk,
            "batches": pos.batches,
            "pass_batches": {str(k): v for k, v in pos.pass_batches.items()},
            "stats": asdict(self._stats),
            "config": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by state_dict(); ask batches_per_epoch() after this, not before."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = state["config"]
        if not self._partitions_given and saved.get("partitions") != self.partitions:
            # partitions defaulted to num_workers: keep the saved layout, so the batch sequence goes on
            # unchanged with another worker count (workers then serve several partitions, or none).
            log.info("data loader: resuming with the saved %s partitions", saved.get("partitions"))
            self.partitions = int(saved["partitions"])
            self._plan_cache = None
        current = self._fingerprint()
        changed = [k for k in current if saved.get(k) != current[k]]
        if changed:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in changed)
            raise UserError(f"cannot resume the data position ({details}): resume with the saved settings")
        self._position = _Position(
            epoch=int(state["epoch"]),
            chunk=int(state["chunk"]),
            batch_in_chunk=int(state["batch_in_chunk"]),
            batches=int(state["batches"]),
            pass_batches={int(k): int(v) for k, v in state["pass_batches"].items()},
        )
        self._stats = StreamStats(**state["stats"])

    def stats(self) -> dict[str, int]:
        return asdict(self._stats)
