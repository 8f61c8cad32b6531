"""Producing batches from an epoch plan's chunks, in DataLoader workers (or in the main process).

Worker w of num_workers serves the partitions p with p % num_workers == w (see plan.py), so no worker
reads another's data; a worker with no such partition holding data yields nothing. For each of its
chunks a worker reads the chunk whole (read.PartitionReader), then:

- Shuffle buffer: the chunk's samples are shuffled and grouped by length into batches (batching.py),
  seeded by (seed, epoch, rank, chunk).
- Masking: a chunk's batches are padded and masked MASK_GROUP at a time (batching.batch_rows lays each
  batch out as one row, Masker.mask_rows masks the rows with one set of tensor ops, each batch still
  getting its own ceil(rate x its tokens) positions, as Masker.mask_batches does) with a generator seeded by
  (seed, epoch, rank, chunk, group), so a sequence gets a fresh mask every epoch and a resumed run,
  which rebuilds the chunk, draws exactly the masks it would have drawn.

Each batch is sent as an Item tagged with its chunk and index, followed by an end marker per chunk; the
main process (stream.py) puts the workers' output back in chunk order, so the batch sequence does not
depend on num_workers.

With a BatchSelection (the global layout of stream.py: one batch sequence for every world size, its
batches dealt to ranks), a rank produces only its own batches: a chunk holding none of them is not read
at all, and only the mask groups holding one are masked (masks stay those of the whole sequence).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distil.common.hashing import mix_seed
from distil.data_pipeline.masking import Masker, unmasked_labels
from distil.data_pipeline.stream.batching import batch_rows, fixed_size_batches, token_budget_batches
from distil.data_pipeline.stream.plan import Chunk, ChunkStats, EpochPlan
from distil.data_pipeline.stream.read import PartitionReader, decode_samples

MASK_GROUP = 64  # batches padded and masked together (batching.batch_rows, Masker.mask_rows)
# Tags of the grouping and masking seed streams; plan.py's shard order uses 3: keep them distinct.
_GROUPING, _MASKING = 1, 2


@dataclass
class BatchingConfig:
    """How a chunk becomes batches: exactly one of batch_size or max_tokens is set."""

    batch_size: int | None
    max_tokens: int | None
    group_by_size: bool
    pad_multiple: int
    chunk_size: int


@dataclass(frozen=True)
class BatchSelection:
    """Which batches of the global batch sequence are this rank's: the sequence is cut into updates of
    world_size x per_update batches, rank r taking the r-th run of per_update consecutive batches of each.
    `counts`: the batches each chunk of one pass makes (exact with a fixed batch size)."""

    rank: int
    world_size: int
    per_update: int
    counts: tuple[int, ...]

    def start(self, chunk_index: int) -> int:
        """Global index of the first batch of chunk `chunk_index` (passes continue the sequence)."""
        passes, i = divmod(chunk_index, len(self.counts))
        return passes * sum(self.counts) + sum(self.counts[:i])

    def owner(self, index: int) -> int:
        return (index // self.per_update) % self.world_size

    def wanted(self, chunk_index: int) -> list[int]:
        """This rank's batches of the chunk, as indices within the chunk."""
        first = self.start(chunk_index)
        n = self.counts[chunk_index % len(self.counts)]
        return [b for b in range(n) if self.owner(first + b) == self.rank]


@dataclass
class Item:
    """What a worker sends: a batch of chunk `chunk`, or (batch is None) the end of that chunk."""

    chunk: int
    index: int  # batch index within the chunk; for an end marker: the chunk's batch count
    batch: dict[str, torch.Tensor] | None
    stats: ChunkStats | None  # the chunk's read stats, on its first item (not on a resumed chunk's: counted)


class ChunkProducer(IterableDataset):
    """The Items of a rank's chunks from `first_chunk` on (skipping `skip_batches` of that one), endlessly:
    the consumer stops when it has the epoch's batch count."""

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
        select: BatchSelection | None = None,
    ) -> None:
        self.plan, self.urls = plan, urls
        self.first_chunk, self.skip_batches = first_chunk, skip_batches
        self.key, self.batching, self.masker = key, batching, masker
        self.pad_id, self.vocab_size, self.max_len = pad_id, vocab_size, max_len
        self.select = select

    def __iter__(self) -> Iterator[Item]:
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
                    skip = self.skip_batches if index == self.first_chunk else 0
                    wanted = None
                    if self.select is not None:
                        wanted = [b for b in self.select.wanted(index) if b >= skip]
                        if not wanted:  # none of this rank's batches: not read at all
                            n = self.select.counts[index % len(self.select.counts)]
                            yield Item(chunk.index, n, None, None)
                            index += 1
                            continue
                    if chunk.partition not in readers:
                        readers[chunk.partition] = PartitionReader(self.plan, self.urls)
                    yield from self._chunk_items(chunk, readers[chunk.partition], skip, wanted)
                index += 1
        finally:
            for reader in readers.values():
                reader.close()

    def _chunk_items(self, chunk: Chunk, reader: PartitionReader, skip: int,
                     wanted: list[int] | None = None) -> Iterator[Item]:
        stats = ChunkStats()
        flat, lengths = decode_samples(reader.read(chunk.start, chunk.stop, stats), self.vocab_size, self.max_len,
                                       stats)
        seqs = (flat, np.cumsum(lengths) - lengths, lengths)
        chunk_key = [*self.key, chunk.pass_, chunk.partition, chunk.number]
        groups = self._group(lengths, np.random.default_rng([*chunk_key, _GROUPING]))
        # Batches are built and masked MASK_GROUP at a time, each group from its own seed: memory stays
        # bounded for large shuffle buffers, and a resumed chunk skips whole groups without masking them
        # (so does a rank for the groups holding none of its batches).
        mine = None if wanted is None else set(wanted)
        # The chunk's read stats travel with its first item (a resumed chunk's were counted before the
        # checkpoint): on the first batch, so that a stream stopped right after its last batch still has
        # them, else on the end marker.
        unsent = stats if skip == 0 else None
        for first in range(skip - skip % MASK_GROUP, len(groups), MASK_GROUP):
            if mine is not None and not any(first <= b < first + MASK_GROUP for b in mine):
                continue
            seed = mix_seed([*chunk_key, first, _MASKING])
            batches = self._make_batches(seqs, groups[first : first + MASK_GROUP], seed)
            for j, batch in enumerate(batches, start=first):
                if j >= skip and (mine is None or j in mine):
                    yield Item(chunk.index, j, batch, unsent)
                    unsent = None
        yield Item(chunk.index, len(groups), None, unsent)

    def _group(self, lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        if not len(lengths):
            return []
        b = self.batching
        if b.max_tokens is not None:
            return token_budget_batches(
                lengths, b.max_tokens, rng, max_len=self.max_len, pad_multiple=b.pad_multiple
            )
        return fixed_size_batches(
            lengths, b.batch_size, rng, max_len=self.max_len, group_by_size=b.group_by_size
        )

    def _make_batches(
        self, seqs: tuple[np.ndarray, np.ndarray, np.ndarray], groups: list[np.ndarray], mask_seed: int
    ) -> list[dict[str, torch.Tensor]]:
        """Pads batches (seqs: the chunk's ids end to end, starts, lengths) and masks them all at once from
        one seeded generator: each batch is one row of the masked arrays (batching.batch_rows), so each
        gets its own ceil(rate x its real tokens) positions, as if masked alone."""
        if not groups:
            return []
        ids, attention, shapes = batch_rows(*seqs, groups, self.pad_id, self.batching.pad_multiple)
        ids, attention = torch.from_numpy(ids), torch.from_numpy(attention)
        if self.masker is None:
            masked, labels = ids, unmasked_labels(ids, attention)
        else:
            masked, labels = self.masker.mask_rows(ids, attention, torch.Generator().manual_seed(mask_seed))
        return [
            {
                "input_ids": masked[row, : size * width].view(size, width),
                "attention_mask": attention[row, : size * width].view(size, width),
                "labels": labels[row, : size * width].view(size, width),
            }
            for row, (size, width) in enumerate(shapes)
        ]
