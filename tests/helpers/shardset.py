"""Builds small shard sets in the format `distil prepare` writes, for the loader tests and benchmark.

Each sample's ids are [CLS] + body + [SEP]; body[0:2] encode the sample's serial number (base ID_BASE over
the non-special ids), so tests can tell which sample a batch row came from.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds

from distil.data_pipeline.manifest import (
    MANIFEST_NAME,
    SAMPLE_KEY,
    TOKEN_COUNTS_NAME,
    Manifest,
    ShardInfo,
    SpecialTokens,
)

SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
FIRST_ID = 5  # ids below this are special


def id_base(vocab_size: int) -> int:
    return vocab_size - FIRST_ID


def make_sample(serial: int, length: int, rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    base = id_base(vocab_size)
    body = rng.integers(FIRST_ID, vocab_size, size=length - 2)
    body[0] = FIRST_ID + serial // base
    body[1] = FIRST_ID + serial % base
    return np.concatenate([[SPECIAL.cls], body, [SPECIAL.sep]]).astype(np.uint16)


def serial_of(row: np.ndarray, vocab_size: int) -> int:
    """The serial number of an unmasked batch row."""
    return int(row[1] - FIRST_ID) * id_base(vocab_size) + int(row[2] - FIRST_ID)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    # An integer mtime, as a reproducible writer sets it: a float one costs a PAX header per member.
    with wds.TarWriter(str(path), mtime=0) as writer:
        for key, payload in samples:
            writer.write({"__key__": key, SAMPLE_KEY: payload})


def make_shard_set(
    root: Path,
    shard_sizes: list[int],
    *,
    holdout_sizes: list[int] = (),
    vocab_size: int = 1000,
    max_len: int = 64,
    min_len: int = 12,
    seed: int = 0,
    zipf: float | None = None,
    full_fraction: float = 0.0,
) -> Path:
    """Writes shards, manifest.json and token_counts.npy under `root`; returns `root`.

    Serial numbers run 0.. over the train shards in order, then on over the holdout shards. With `zipf`,
    body ids (after the serial) follow a Zipf law, as real text, so token counts are skewed. Lengths are
    uniform in [min_len, max_len], except a `full_fraction` of samples at exactly max_len (as long
    documents cut into max_len chunks give).
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = np.zeros(vocab_size, dtype=np.int64)
    serial = 0

    def write_split(prefix: str, sizes: list[int], count: bool) -> list[ShardInfo]:
        nonlocal serial
        infos = []
        for n, size in enumerate(sizes):
            samples, tokens = [], 0
            for _ in range(size):
                full = rng.random() < full_fraction
                length = max_len if full else int(rng.integers(min_len, max_len + 1))
                ids = make_sample(serial, length, rng, vocab_size)
                if zipf is not None:
                    tail = np.minimum(rng.zipf(zipf, size=len(ids) - 4) + FIRST_ID - 1, vocab_size - 1)
                    ids[3:-1] = tail.astype(np.uint16)
                samples.append((f"{prefix}{n:03d}-{serial:07d}", npy_bytes(ids)))
                tokens += len(ids)
                if count:
                    np.add.at(counts, ids.astype(np.int64), 1)
                serial += 1
            name = f"{prefix}-{n:06d}.tar"
            write_shard(root / name, samples)
            infos.append(ShardInfo(path=name, samples=size, tokens=tokens))
        return infos

    shards = write_split("train", shard_sizes, count=True)
    holdout = write_split("holdout", list(holdout_sizes), count=False)
    manifest = Manifest(
        shards=shards,
        holdout_shards=holdout,
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        max_len=max_len,
        dtype="uint16",
        tokenizer_name="test-fixture",
        tokenizer_sha256="0" * 64,
    )
    (root / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    np.save(root / TOKEN_COUNTS_NAME, counts, allow_pickle=False)
    return root
