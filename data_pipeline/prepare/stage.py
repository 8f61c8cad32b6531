"""`distil prepare`: raw text -> tokenised webdataset shards + manifest.json + token_counts.npy + tokenizer/.

The main process reads documents in a fixed order and cuts them into batches of about `batch_bytes` of
text; worker processes tokenise a batch at a time and return its samples as finished tar members; the main
process appends them to the shards in batch order, or (by default) to the buckets of a seeded external
shuffle (data_pipeline/prepare/shuffle.py) that then writes each split to its shards in a random order. So the
output depends only on the inputs and the flags, never on `--workers` or on scheduling. Held-out documents
are chosen by a hash of (seed, document index).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from distil.common.errors import UserError
from distil.common.hashing import unit_floats
from distil.data_pipeline.manifest import TOKENIZER_DIR_NAME, Manifest, SpecialTokens
from distil.data_pipeline.prepare import corpus, shards
from distil.data_pipeline.prepare import shuffle as shuffling
from distil.data_pipeline.prepare import tokenize as tk

DEFAULT_BATCH_BYTES = 1 << 20
TRAINED_TOKENIZER_NAMES = {"wordpiece": "wordpiece-uncased-{vocab_size}-trained",
                           "bpe": "byte-level-bpe-{vocab_size}-trained"}


@dataclass
class PrepareConfig:
    """`distil prepare`'s settings: a YAML file (`--config`), its options and `key=value` overrides."""

    inputs: list[str] = field(default_factory=list)  # text / JSONL / Parquet files, folders or globs
    output: Path | None = None  # folder for the shard set
    tokenizer: str | None = None
    train_tokenizer: int | None = None  # vocab size of a tokenizer trained on the corpus
    train_tokenizer_kind: str | None = None  # wordpiece (None: the default, BERT's) | bpe (byte-level, RoBERTa's)
    max_seq_len: int = 512
    workers: int | None = None  # None: one per CPU, fewer for a small corpus
    pack: bool = False
    holdout_fraction: float = 0.0
    shard_size_mb: float = 256.0
    text_field: str = "text"
    doc_separator: str = "line"  # "line" | "blank-line"
    overwrite: bool = False
    seed: int = 0
    shuffle: bool = True  # write each split's sequences in a random order seeded by `seed`, not corpus order
    command: list[str] = field(default_factory=list)  # recorded in the manifest
    progress: bool = True
    batch_bytes: int = DEFAULT_BATCH_BYTES
    shuffle_bucket_bytes: int = shuffling.BUCKET_BYTES

    def validate(self) -> None:
        if not self.inputs:
            raise UserError("give at least one --input PATH (or inputs: [...] in the --config file)")
        if self.output is None:
            raise UserError("give --output FOLDER (or output: in the --config file) for the shard set")
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise UserError("pass exactly one of --tokenizer NAME_OR_DIR and --train-tokenizer VOCAB_SIZE")
        if self.train_tokenizer_kind is not None and self.train_tokenizer is None:
            raise UserError("--train-tokenizer-kind needs --train-tokenizer VOCAB_SIZE (a tokenizer given by "
                            "--tokenizer is used as it is)")
        if self.train_tokenizer_kind not in (None, *tk.TOKENIZER_KINDS):
            raise UserError(f"--train-tokenizer-kind {self.train_tokenizer_kind}: choose one of "
                            f"{', '.join(tk.TOKENIZER_KINDS)}")
        if self.train_tokenizer is not None and self.train_tokenizer < 100:
            raise UserError(f"--train-tokenizer {self.train_tokenizer}: a vocabulary needs at least 100 entries")
        if self.max_seq_len < tk.MIN_SEQUENCE_TOKENS:
            raise UserError(f"--max-seq-len {self.max_seq_len}: must be at least {tk.MIN_SEQUENCE_TOKENS}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise UserError(f"--holdout-fraction {self.holdout_fraction}: must be in [0, 1)")
        if self.shard_size_mb <= 0:
            raise UserError(f"--shard-size-mb {self.shard_size_mb}: must be positive")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers {self.workers}: must be at least 1")
        if self.doc_separator not in corpus.DOC_SEPARATORS:
            raise UserError(f"--doc-separator {self.doc_separator}: use one of {', '.join(corpus.DOC_SEPARATORS)}")


# ---------------------------------------------------------------- worker side


@dataclass
class _WorkerSettings:
    tokenizer_json: str
    special: SpecialTokens
    max_len: int
    pack: bool
    holdout_fraction: float
    seed: int
    vocab_size: int
    dtype: str


@dataclass
class BatchResult:
    train: shards.Members  # the kept sequences as tar members, in order
    holdout: shards.Members
    token_counts: np.ndarray  # over the train sequences
    stats: dict[str, int]


_settings: _WorkerSettings | None = None
_encoder: tk.Encoder | None = None


def _init_worker(settings: _WorkerSettings) -> None:
    global _settings, _encoder
    _settings = settings
    _encoder = tk.Encoder(settings.tokenizer_json)


def holdout_mask(seed: int, first_document: int, count: int, fraction: float) -> np.ndarray:
    """Whether each document goes to the held-out split: splitmix64 of (seed, document index) < fraction."""
    if fraction <= 0.0:
        return np.zeros(count, dtype=bool)
    documents = np.arange(first_document, first_document + count, dtype=np.uint64)
    return unit_floats(seed & 0xFFFFFFFF, documents) < fraction


def process_batch(task: tuple[int, int, list[list[str]]]) -> BatchResult:
    """Tokenises one batch of documents into finished tar members (runs in a worker process).

    Sample keys are `{batch:010d}-{index in batch:07d}`: unique, and in corpus order when sorted (also after
    the shuffle, which moves whole members).

    Python's cyclic garbage collector is paused meanwhile: the batch makes hundreds of thousands of small
    lists and no reference cycles, and each collection would walk the encoder's caches too (30 % of the
    encoding time on real text). Afterwards everything still alive (the caches) is moved out of the
    collector's sight (gc.freeze).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _process_batch(task)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _process_batch(task: tuple[int, int, list[list[str]]]) -> BatchResult:
    assert _settings is not None and _encoder is not None, "worker not initialised"
    s = _settings
    batch_number, first_document, documents = task
    encoded = _encoder.encode_batch([segment for document in documents for segment in document])
    to_holdout = holdout_mask(s.seed, first_document, len(documents), s.holdout_fraction)
    stats = dict.fromkeys(("sequences", "dropped_short", "dropped_unk", "split_long"), 0)
    kept: dict[bool, tuple[list[int], list[list[int]]]] = {False: ([], []), True: ([], [])}  # (numbers, ids)
    position = 0
    for index, document in enumerate(documents):
        segments = encoded[position : position + len(document)]
        position += len(document)
        if max(map(len, segments)) + 2 > s.max_len:
            stats["split_long"] += sum(1 for ids in segments if len(ids) + 2 > s.max_len)
        numbers, sequences = kept[bool(to_holdout[index])]
        for sequence in tk.document_sequences(segments, s.special.cls, s.special.sep, s.max_len, s.pack):
            reason = tk.drop_reason(sequence, s.special.unk)
            if reason is not None:
                stats["dropped_" + reason] += 1
                continue
            numbers.append(stats["sequences"])
            stats["sequences"] += 1
            sequences.append(sequence)
    members, counts = {}, np.zeros(s.vocab_size, dtype=np.int64)
    for held_out, (numbers, sequences) in kept.items():
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        ids = np.fromiter(chain.from_iterable(sequences), dtype=s.dtype, count=int(lengths.sum()))
        members[held_out] = shards.Members.of_sequences(batch_number, np.asarray(numbers), ids, lengths)
        if not held_out:
            counts = np.bincount(ids, minlength=s.vocab_size).astype(np.int64)
    return BatchResult(members[False], members[True], counts, stats)


# ---------------------------------------------------------------- main side


def _batches(documents: Iterator[list[str]], batch_bytes: int) -> Iterator[tuple[int, int, list[list[str]]]]:
    """(batch number, index of its first document, documents) with about `batch_bytes` of text each."""
    batch: list[list[str]] = []
    number = first = size = 0
    for index, document in enumerate(documents):
        if not batch:
            first = index
        batch.append(document)
        size += sum(map(len, document))
        if size >= batch_bytes:
            yield number, first, batch
            number += 1
            batch, size = [], 0
    if batch:
        yield number, first, batch


def _text_batches(sources: list[corpus.Source], config: PrepareConfig) -> Iterator[list[str]]:
    documents = corpus.iter_documents(sources, separator=config.doc_separator, text_field=config.text_field)
    for _, _, batch in _batches(documents, config.batch_bytes):
        yield [segment for document in batch for segment in document]


def _get_tokenizer(sources: list[corpus.Source], config: PrepareConfig):
    if config.tokenizer is not None:
        tokenizer = tk.load_tokenizer(config.tokenizer)
        return tokenizer, config.tokenizer
    assert config.train_tokenizer is not None
    kind = config.train_tokenizer_kind or "wordpiece"
    if config.progress:
        print(f"training a {config.train_tokenizer}-entry {kind} tokenizer on the corpus...", file=sys.stderr)
    tokenizer = tk.train_tokenizer(kind, lambda: _text_batches(sources, config), config.train_tokenizer)
    return tokenizer, TRAINED_TOKENIZER_NAMES[kind].format(vocab_size=config.train_tokenizer)


def _results(
    tasks: Iterator[tuple[int, int, list[list[str]]]], settings: _WorkerSettings, workers: int
) -> Iterator[BatchResult]:
    """Batch results in task order; at most 2 x workers batches in flight, so memory stays bounded."""
    if workers == 1:
        _init_worker(settings)
        try:
            for task in tasks:
                yield process_batch(task)
        finally:
            gc.unfreeze()  # in this process: what process_batch froze goes back to the collector
        return
    context = mp.get_context("spawn")  # no fork of a process that may hold tokenizer/torch threads
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(process_batch, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(desc="prepare", unit="tok", unit_scale=True, disable=None if enabled else True, file=sys.stderr)


# Shard bytes per input byte, a generous guess for choosing the shuffle's bucket count: a short line of text
# becomes a 512-byte tar header plus a 512-byte block of .npy. Too high only makes buckets smaller; too low
# makes the shuffle split its oversized buckets once more before loading them.
_SHARD_BYTES_PER_TEXT_BYTE = 8
_COMPRESSION_RATIO = 4  # .gz / .zst / Parquet


def expected_shard_bytes(sources: list[corpus.Source]) -> int:
    """A rough upper estimate of the shard bytes the corpus becomes (for the shuffle's bucket count)."""
    total = 0
    for source in sources:
        compressed = source.compression is not None or source.format == "parquet"
        total += source.bytes * (_COMPRESSION_RATIO if compressed else 1)
    return total * _SHARD_BYTES_PER_TEXT_BYTE


class _SplitOutput:
    """One split's way to its shards: straight to the writer, or through a seeded external shuffle."""

    def __init__(self, temp: Path, name: str, config: PrepareConfig, split: int, expected_bytes: int) -> None:
        self.writer = shards.ShardSetWriter(temp, name, int(config.shard_size_mb * (1 << 20)))
        self.shuffle = None
        if config.shuffle:
            self.shuffle = shuffling.ExternalShuffle(
                temp / ".shuffle", name, config.seed, split, expected_bytes, config.shuffle_bucket_bytes
            )

    def write(self, members: shards.Members) -> None:
        if self.shuffle is None:
            self.writer.write(members)
        else:
            self.shuffle.add(members)

    def close(self) -> list:
        if self.shuffle is not None:
            self.shuffle.drain(self.writer)
        return self.writer.close()


def _write_shards(
    sources: list[corpus.Source], settings: _WorkerSettings, config: PrepareConfig, temp: Path
) -> tuple[list, list, np.ndarray, dict[str, int]]:
    read_stats = corpus.ReadStats()
    documents = corpus.iter_documents(
        sources, separator=config.doc_separator, text_field=config.text_field, stats=read_stats
    )
    expected = expected_shard_bytes(sources)
    train = _SplitOutput(temp, "train", config, 0, int(expected * (1 - config.holdout_fraction)))
    holdout = _SplitOutput(temp, "holdout", config, 1, int(expected * config.holdout_fraction))
    counts = np.zeros(settings.vocab_size, dtype=np.int64)
    totals: dict[str, int] = {}
    with _progress(config.progress) as bar:
        workers = config.workers or auto_workers(sources, config.batch_bytes)
        for result in _results(_batches(documents, config.batch_bytes), settings, workers):
            train.write(result.train)
            holdout.write(result.holdout)
            counts += result.token_counts
            for name, value in result.stats.items():
                totals[name] = totals.get(name, 0) + value
            bar.update(sum(result.train.tokens) + sum(result.holdout.tokens))
    if config.shuffle and config.progress:
        print("prepare: writing the shuffled shards...", file=sys.stderr)
    train_shards, holdout_shards = train.close(), holdout.close()
    shutil.rmtree(temp / ".shuffle", ignore_errors=True)
    totals.update(documents=read_stats.documents, segments=read_stats.segments, replaced_utf8=read_stats.replaced_utf8)
    return train_shards, holdout_shards, counts, totals


def prepare(config: PrepareConfig) -> Manifest:
    """Runs the whole stage; returns the manifest of the published shard set."""
    config.validate()
    output = Path(config.output)
    sources = corpus.resolve_sources(config.inputs, exclude=output)
    if not sources:
        raise UserError("the inputs hold no files besides the output folder; pass files with text in them")
    shards.check_output(output, config.overwrite)
    first = next(corpus.iter_documents(sources, separator=config.doc_separator, text_field=config.text_field), None)
    if first is None:
        raise UserError("the inputs hold no text (every line is empty); pass files with text in them")
    tokenizer, tokenizer_name = _get_tokenizer(sources, config)
    special = tk.special_tokens_of(tokenizer, tokenizer_name)
    vocab_size = len(tokenizer)
    dtype = shards.ids_dtype(vocab_size)
    settings = _WorkerSettings(
        tokenizer_json=tk.tokenizer_json(tokenizer),
        special=special,
        max_len=config.max_seq_len,
        pack=config.pack,
        holdout_fraction=config.holdout_fraction,
        seed=config.seed,
        vocab_size=vocab_size,
        dtype=dtype.name,
    )
    temp = shards.make_temp_folder(output)
    try:
        train, holdout, counts, stats = _write_shards(sources, settings, config, temp)
        if not train:
            raise UserError(
                f"no sequences left after filtering ({stats['dropped_short']} of <= 11 tokens, "
                f"{stats['dropped_unk']} >= 50 % [UNK]); pass more text or a tokenizer that covers it"
            )
        stats["holdout_sequences"] = sum(s.samples for s in holdout)
        stats["train_sequences"] = sum(s.samples for s in train)
        tk.save_tokenizer(tokenizer, temp / TOKENIZER_DIR_NAME)
        shards.save_token_counts(temp, counts)
        manifest = Manifest(
            shards=train,
            holdout_shards=holdout,
            vocab_size=vocab_size,
            special_tokens=special,
            max_len=config.max_seq_len,
            dtype=dtype.name,
            tokenizer_name=tokenizer_name,
            tokenizer_sha256=tk.tokenizer_sha256(tokenizer),
            tokenizer_dir=TOKENIZER_DIR_NAME,
            packed=config.pack,
            shuffled=config.shuffle,
            seed=config.seed,
            sources=[s.describe() for s in sources],
            command=list(config.command),
            stats=dict(sorted(stats.items())),
        )
        shards.write_manifest(temp, manifest)  # last: a folder with a manifest is a complete shard set
        shards.publish(temp, output, config.overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return manifest


def auto_workers(sources: list[corpus.Source], batch_bytes: int) -> int:
    """One worker per available CPU, but no more than the corpus has batches for (about 4 each): starting
    a worker process costs about a second, which a small corpus does not repay."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    batches = sum(s.bytes for s in sources) // batch_bytes
    return max(1, min(cpus, batches // 4))
