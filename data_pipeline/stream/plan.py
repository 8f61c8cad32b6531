"""Epoch planning for the streaming loader: which samples each rank reads, in which partitions and chunks.

How an epoch is laid out (everything here is a pure function of the manifest's sample counts and
(seed, epoch, rank, world_size), so every rank can compute it, before reading a byte):

1. Shard order: the split's shards permuted by (seed, epoch) -- the same on every rank -- and read as
   one sequence of N samples.
2. Ranks: rank r takes positions [r*n, (r+1)*n) of that sequence, n = ceil(N / world_size), wrapping
   around at N (so a few samples repeat when N is not a multiple of world_size). Splitting at sample
   granularity, not by whole shards, gives every rank the same number of samples whatever the shard
   counts, hence the same number of batches: no rank waits on a collective forever.
3. Partitions: a rank's range is cut into `partitions` contiguous parts (by default one per DataLoader
   worker), each read sequentially by its own tar reader (read.PartitionReader). A partition that starts
   inside a shard reads past that shard's first samples, so more partitions cost more reading. The batch
   sequence depends on `partitions`, not on num_workers: a resumed stream keeps the saved partition count
   (unless one is passed explicitly), so a run can resume with another number of workers.
4. Chunks: each partition is cut into chunks of `chunk_size` samples (the shuffle buffer, rounded up to
   a multiple of batch_size); produce.py turns each chunk into batches. Chunks are numbered round-robin
   over the partitions: chunk 0 of every partition, then chunk 1, ... When a rank needs more batches
   than one pass over its range gives (max_tokens, corrupt data), chunk indices go on into further passes
   over the same range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tag of the shard-order seed stream; produce.py's seed streams use 1 and 2: keep them distinct.
_SHARD_ORDER = 3


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the rank's chunk sequence (counts across passes)
    pass_: int  # 0 for the first pass over the rank's range, 1+ when the range is read again
    partition: int
    number: int  # chunk number within its partition
    start: int  # rank-range positions [start, stop)
    stop: int


@dataclass
class ChunkStats:
    """What reading one chunk skipped (corrupt input)."""

    skipped_samples: int = 0
    skipped_shards: int = 0


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

    def samples_in(self, k: int) -> int:
        """Samples of the k-th shard in epoch order."""
        return int(self.shard_starts[k + 1] - self.shard_starts[k])

    def locate(self, rank_position: int) -> tuple[int, int]:
        """(index into shard_order, sample offset in that shard) of a rank-range position."""
        q = (self.rank_start + rank_position) % self.total
        k = int(np.searchsorted(self.shard_starts, q, side="right")) - 1
        return k, q - int(self.shard_starts[k])
