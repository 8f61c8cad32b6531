"""The streaming loader: webdataset shards -> per-rank, length-grouped, dynamically masked batches.

PretrainStream is the public entry point; it owns the position in the stream and puts the pieces
together:

- plan.py: the epoch plan -- shard order, each rank's range, its partitions and chunks -- a pure
  function of the manifest's sample counts and (seed, epoch, rank, world_size);
- read.py: where the shard set lives (folder, http(s), `pipe:` command) and reading its samples;
- produce.py: turning chunks into shuffled, length-grouped, masked batches in DataLoader workers;
- position.py: the position and the counts kept with it, their saved form and the checks on resume.

The workers' output is put back in chunk order here, so the batch sequence depends on `partitions`, not
on num_workers.

The position in the stream is (epoch, chunk index, batches already taken from that chunk): state_dict()
is that, and a resumed stream re-reads the current chunk and skips the batches already taken.

Layouts. By default (layout="per_rank") each rank plans its own contiguous range of the epoch (plan.py),
so a position resumes only on the same world size. With layout="global" (the trainer's, with batch_size:
fixed-size batches) every rank plans the epoch as one process would (world size 1) and the resulting
batch sequence is dealt to the ranks, update by update:
of each run of world_size x micro_batches_per_update batches, rank r takes the r-th run of
micro_batches_per_update (produce.BatchSelection). So the samples of an update, and their masks, do not
depend on the world size (1 process x accumulation 2 trains on what 2 processes x 1 do), and the position
is global: a stream saved at an update boundary by W processes resumes on W' processes with the same
world_size x micro_batches_per_update ("elastic" resume; load_state_dict with the saved ranks' states).
A rank reads only the chunks that hold one of its batches. The global layout needs batch_size: with
max_tokens, batch counts are unknown before reading. Evening out the ranks costs whole batches there
(fewer than world_size x micro_batches_per_update per epoch, from a further pass) where the per-rank
layout repeats fewer than world_size samples.

batches_per_epoch() is exact with batch_size (sum over chunks of ceil(chunk / batch_size); in the global
layout the epoch's batches are rounded up to whole updates, the last one filled with batches of a further
pass, freshly shuffled and masked). With a token budget (max_tokens) the count depends on lengths nobody knows up front, so it is estimated from
the manifest's token counts and every rank yields exactly that many: when a rank's data runs out early it
starts another pass over its own range (fresh shuffle and masks); when data is left at the end it waits
for the next epoch. Corrupt data that shrinks a rank's batches is made up the same way; what was skipped
is counted in stats().
"""

from __future__ import annotations

import logging
import math
import signal
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from distil.common.errors import UserError
from distil.common.signals import STOP_SIGNALS
from distil.data_pipeline.manifest import Manifest, ShardInfo
from distil.data_pipeline.masking import Masker, MaskingConfig
from distil.data_pipeline.stream.batching import padded_length
from distil.data_pipeline.stream.plan import EpochPlan
from distil.data_pipeline.stream.position import (
    Position,
    StreamStats,
    global_batches_taken,
    rank_position,
    restored_position,
    resumes_elsewhere,
    saved_state,
    upgrade_state,
)
from distil.data_pipeline.stream.produce import BatchingConfig, BatchSelection, ChunkProducer, Item
from distil.data_pipeline.stream.read import check_shards_exist, load_token_counts, open_shard_set

log = logging.getLogger(__name__)

LAYOUTS = ("per_rank", "global")


def _check_arguments(
    *,
    batch_size: int | None,
    max_tokens: int | None,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    shuffle_buffer: int,
    pad_multiple: int,
    per_update: int = 1,
    layout: str = "per_rank",
) -> None:
    if per_update < 1:
        raise UserError(f"micro_batches_per_update {per_update} must be >= 1")
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "global" and batch_size is None:
        raise UserError("the global layout needs a batch_size (with max_tokens batch counts are unknown before "
                        "reading)")
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


def _check_token_budget(max_tokens: int | None, max_len: int, pad_multiple: int) -> None:
    if max_tokens is not None and max_tokens < padded_length(max_len, pad_multiple):
        raise UserError(
            f"max_tokens {max_tokens} cannot hold one sequence of max_len {max_len}: "
            f"use at least {padded_length(max_len, pad_multiple)}"
        )


def _leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """A job's SIGTERM / SIGINT reaches every process of it: its process group (Ctrl-C, a pod's stop, `kill
    -TERM -PGID`), every process of a SLURM step, the DeepSpeed launcher's passing-on to each rank's process
    tree. PyTorch's workers die of it, and the main process then raises "DataLoader worker ... is killed by
    signal" wherever it is, mid-stop included. The main process owns the stop (it finishes the update,
    checkpoints, then closes the loader, which ends the workers); workers also end when it dies."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


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
        micro_batches_per_update: int = 1,
        layout: str = "per_rank",
    ) -> None:
        _check_arguments(
            batch_size=batch_size,
            max_tokens=max_tokens,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            pad_multiple=pad_multiple,
            per_update=micro_batches_per_update,
            layout=layout,
        )
        self.shard_set = open_shard_set(shards)
        self.manifest: Manifest = self.shard_set.manifest
        self.split = split
        self._shards = self._split_shards(shards, split, check_shards)
        _check_token_budget(max_tokens, self.manifest.max_len, pad_multiple)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_update = micro_batches_per_update
        self.global_layout = layout == "global"  # see the module docstring
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self._partitions_given = partitions is not None
        self.partitions = partitions if partitions is not None else max(1, num_workers)
        chunk_size = shuffle_buffer if batch_size is None else -(-shuffle_buffer // batch_size) * batch_size
        self.batching = BatchingConfig(batch_size, max_tokens, group_by_size, pad_multiple, chunk_size)
        self.masking = masking
        self.token_counts: np.ndarray | None = None
        self.masker: Masker | None = None
        if masking is not None:
            self.token_counts, self.masker = self._make_masker(masking)
        self._urls = [self.shard_set.read_url(s.path) for s in self._shards]
        self._position = Position()
        self._stats = StreamStats()
        self._plan_cache: tuple[int, EpochPlan] | None = None

    def _split_shards(self, shards: str, split: str, check_shards: bool) -> list[ShardInfo]:
        """The split's shards that hold samples; with check_shards, a missing one is an error now."""
        selected = [s for s in self.shard_set.shards(split) if s.samples > 0]
        if not selected:
            raise UserError(f"the {split} split of {shards} holds no samples: re-run `distil prepare`")
        if check_shards:
            check_shards_exist(self.shard_set, selected)
        return selected

    def _make_masker(self, masking: MaskingConfig) -> tuple[np.ndarray, Masker]:
        token_counts = load_token_counts(self.shard_set)
        special = self.manifest.special_tokens
        masker = Masker(masking, token_counts, special.ids(), special.mask, self.manifest.vocab_size)
        return token_counts, masker

    # -- epoch layout ---------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rank, world_size = (0, 1) if self.global_layout else (self.rank, self.world_size)
            plan = EpochPlan(
                [s.samples for s in self._shards],
                seed=self.seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                partitions=self.partitions,
                chunk_size=self.batching.chunk_size,
            )
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def _chunk_batches(self, plan: EpochPlan) -> tuple[int, ...]:
        """Batches each chunk of one pass makes (global layout: a fixed batch size)."""
        assert self.batching.batch_size is not None
        return tuple(-(-n // self.batching.batch_size) for n in plan.chunk_lengths())

    def _selection(self, plan: EpochPlan) -> BatchSelection | None:
        if not self.global_layout or self.world_size == 1:
            return None  # one process takes every batch
        return BatchSelection(self.rank, self.world_size, self.per_update, self._chunk_batches(plan))

    def batches_per_epoch(self) -> int:
        """The same on every rank; exact with batch_size, an estimate every rank sticks to with max_tokens."""
        plan = self._plan(self._position.epoch)
        b = self.batching
        if b.batch_size is not None:
            batches = sum(self._chunk_batches(plan))
            if not self.global_layout:
                return batches
            updates = -(-batches // (self.world_size * self.per_update))  # whole updates, the last filled
            return updates * self.per_update
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
            self._position = Position(epoch=epoch)

    def rewind(self) -> None:
        """Back to the start of the current epoch (e.g. to evaluate on the same held-out batches again)."""
        self._position = Position(epoch=self._position.epoch)

    @property
    def epoch(self) -> int:
        return self._position.epoch

    # -- iteration ------------------------------------------------------------------------------------

    def _producer(self) -> ChunkProducer:
        pos = self._position
        special = self.manifest.special_tokens
        plan = self._plan(pos.epoch)
        return ChunkProducer(
            plan,
            self._urls,
            first_chunk=pos.chunk,
            skip_batches=pos.batch_in_chunk,
            key=(self.seed, pos.epoch, 0 if self.global_layout else self.rank),
            select=self._selection(plan),
            batching=self.batching,
            masker=self.masker,
            pad_id=special.pad,
            vocab_size=self.manifest.vocab_size,
            max_len=self.manifest.max_len,
        )

    def _items(self) -> Iterator[Item]:
        producer = self._producer()
        if self.num_workers == 0:
            return iter(producer)
        loader = DataLoader(
            producer,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            worker_init_fn=_leave_stop_signals_to_the_main_process,
            # Its own generator: starting workers draws their base seed from it, which would otherwise be a
            # draw from torch's global RNG (the model's dropout) each time the loader starts, so a resumed run
            # (one more start) would drop out differently from an uninterrupted one. Batches and masks
            # do not depend on it (produce.py seeds by position).
            generator=torch.Generator().manual_seed(self.seed),
        )
        # The workers start (fork) with the stop signals blocked, so one arriving while they start waits until
        # each worker ignores it; the main process gets its own copy as soon as the mask is restored.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        total = self.batches_per_epoch()
        if self._position.batches >= total:
            return
        plan = self._plan(self._position.epoch)
        items = self._items()
        pending: dict[int, deque[Item]] = defaultdict(deque)
        try:
            while self._position.batches < total:
                item = self._next_in_order(items, pending)
                pos = self._position
                if item.stats is not None:
                    self._stats.add_chunk(item.stats)
                if item.batch is None:
                    self._finish_chunk(plan, pos, item.index)
                    continue
                pos.batch_in_chunk = item.index + 1
                pos.batches += 1
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

    def _next_in_order(self, items: Iterator[Item], pending: dict[int, deque[Item]]) -> Item:
        want = self._position.chunk
        while not pending[want]:
            item = next(items)
            pending[item.chunk].append(item)
        item = pending[want].popleft()
        if not pending[want]:
            del pending[want]
        return item

    def _finish_chunk(self, plan: EpochPlan, pos: Position, made: int) -> None:
        pass_ = pos.chunk // plan.chunks_per_pass
        pos.pass_batches[pass_] = pos.pass_batches.get(pass_, 0) + made
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

    # -- state (position.py) --------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "per_update": self.per_update,
            "layout": "global" if self.global_layout else "per_rank",
            "seed": self.seed,
            "partitions": self.partitions,
            "samples": sum(s.samples for s in self._shards),
            "shards": len(self._shards),
            "batching": asdict(self.batching),
        }

    def state_dict(self) -> dict[str, Any]:
        return saved_state(self._position, world_size=self.world_size, per_update=self.per_update,
                           global_layout=self.global_layout, stats=asdict(self._stats), config=self._fingerprint())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by state_dict() (global layout: saved by any rank of any world size
        with the same world_size x micro_batches_per_update, at an update boundary); ask
        batches_per_epoch() after this, not before."""
        state = upgrade_state(state, world_size=self.world_size, per_update=self.per_update,
                              layout="global" if self.global_layout else "per_rank")
        saved = state["config"]
        if not self._partitions_given and saved.get("partitions") != self.partitions:
            # partitions defaulted to num_workers: keep the saved layout, so the batch sequence goes on
            # unchanged with another worker count (workers then serve several partitions, or none).
            log.info("data loader: resuming with the saved %s partitions", saved.get("partitions"))
            self.partitions = int(saved["partitions"])
            self._plan_cache = None
        if resumes_elsewhere(saved, self._fingerprint()):  # the global position, mapped onto this rank
            taken = global_batches_taken(state, world_size=self.world_size, per_update=self.per_update)
            epoch = int(state["epoch"])
            self._position = rank_position(epoch, taken, rank=self.rank, world_size=self.world_size,
                                           per_update=self.per_update,
                                           chunk_batches=self._chunk_batches(self._plan(epoch)))
        else:
            self._position = restored_position(state)
        self._stats = StreamStats(**state["stats"])

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """The position saved by another number of ranks (CheckpointManager, one state per saved rank): the
        global position is the same in each; the global layout continues from it."""
        if not self.global_layout:
            raise UserError(f"the data position was saved by {len(states)} processes and this stream has "
                            f"{self.world_size}: with data.max_tokens resume with {len(states)} processes")
        self.load_state_dict(states[0])

    def stats(self) -> dict[str, int]:
        return asdict(self._stats)
