"""Reading shard sets for the streaming loader: where a set lives, its side files, and its samples.

`shards` may be a folder or manifest.json path, an http(s) URL of either, or a `pipe:` command with a
`{path}` placeholder, e.g. `pipe:aws s3 cp s3://bucket/wiki/{path} -`: it is run with {path} set to
manifest.json, token_counts.npy and each shard's relative path, and must write that file to stdout
(open_shard_set, ShardSet). Local and http(s) shards are checked at start (check_shards_exist).

A partition of a rank's range (see plan.py) is read sequentially by one PartitionReader, which keeps one
shard open and seeks forward in it; the tar stream, opened with webdataset's gopen, is parsed by
tarscan.TarSamples (the samples webdataset over tarfile yields, by test, at a fraction of the cost per
sample). Corrupt input (a truncated tar, an undecodable or out-of-range sample) is skipped and counted in
the chunk's ChunkStats; the positions it should have held stay empty, so resuming stays exact. Samples are decoded only from .npy with pickling disabled (see load_npy): shards
are data, never code.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from webdataset import gopen

from distil.common.errors import UserError
from distil.data_pipeline.manifest import (
    MANIFEST_NAME,
    SAMPLE_KEY,
    TOKEN_COUNTS_NAME,
    Manifest,
    ShardInfo,
    load_manifest,
    shard_url,
)
from distil.data_pipeline.stream.plan import ChunkStats, EpochPlan
from distil.data_pipeline.stream.tarscan import TarSamples

log = logging.getLogger(__name__)

PIPE_PLACEHOLDER = "{path}"


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
    where = shard_set.url(TOKEN_COUNTS_NAME)
    try:
        counts = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - damaged bytes make numpy's parser raise almost anything
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"{where} is not a valid .npy array ({type(e).__name__}: {first}); re-run `distil prepare`"
        ) from None
    vocab = shard_set.manifest.vocab_size
    if not isinstance(counts, np.ndarray) or counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise UserError(f"{where} must be a 1-D integer array of counts per vocab id; re-run `distil prepare`")
    if counts.shape[0] != vocab or (counts.size and int(counts.min()) < 0):
        raise UserError(
            f"{where} holds {counts.shape[0]} counts (negative ones?) for a vocabulary of {vocab}: the file is "
            "damaged; re-run `distil prepare`"
        )
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
# Reading samples


class RawSample(NamedTuple):
    url: str  # the shard's
    key: str
    data: bytes | None  # the sample's ids.npy member; None when it has none


class _ShardReader:
    """Sequential reader of one shard (tarscan.TarSamples over its stream) with forward seeks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.next_index = 0  # index of the sample read next
        self.failed_at: int | None = None  # sample index where reading broke off early
        self._stream = self._tar = None
        self._why: str | None = None  # why the shard could not be opened
        try:
            self._stream = gopen(url, "rb")
            self._tar = TarSamples(self._stream, SAMPLE_KEY)
        except Exception as e:  # noqa: BLE001 - whatever the opener raises, the shard is unreadable
            self._why = f"cannot be opened ({type(e).__name__}: {e})"

    def _read(self, count: int) -> list[tuple[str, bytes | None]]:
        got = [] if self.failed_at is not None or self._tar is None else self._tar.read(count)
        if len(got) < count and self.failed_at is None:
            self.failed_at = self.next_index + len(got)
            why = self._why if self._tar is None else self._tar.error
            warn_once(self.url, f"it ends after {self.failed_at} samples ({why or 'no more members'}); the "
                      "samples the manifest lists beyond that are skipped")
        self.next_index += len(got)
        return got

    def take(self, first: int, count: int) -> list[RawSample | None]:
        """The raw samples first .. first + count - 1 (first >= next_index); None for each one the shard
        cannot deliver."""
        if first > self.next_index:
            self._read(first - self.next_index)  # skipped over
        got = self._read(count) if self.next_index == first else []
        return [RawSample(self.url, key, data) for key, data in got] + [None] * (count - len(got))

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001, S110 - a pipe: command that failed was reported already
                pass
            self._stream = None


class PartitionReader:
    """Reads rank-range positions of one partition in increasing order, keeping one shard open."""

    def __init__(self, plan: EpochPlan, urls: list[str]) -> None:
        self.plan = plan
        self.urls = urls  # in manifest order
        self._open: tuple[int, _ShardReader] | None = None

    def read(self, start: int, stop: int, stats: ChunkStats) -> list[RawSample | None]:
        """The raw sample at each position of [start, stop), None where its shard cannot deliver it
        (counted in `stats`). Positions are located once per run of one shard."""
        out: list[RawSample | None] = []
        position = start
        while position < stop:
            k, offset = self.plan.locate(position)
            run = min(stop - position, self.plan.samples_in(k) - offset)
            reader = self._reader_for(k, offset)
            samples = reader.take(offset, run)
            stats.skipped_samples += samples.count(None)
            # A shard that breaks off counts once, in the chunk holding its first missing sample.
            if reader.failed_at is not None and offset <= reader.failed_at < offset + run:
                stats.skipped_shards += 1
            out += samples
            position += run
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
    """A 1-D integer .npy: np.save's exact header recognised directly (_fast_header), anything else (other
    versions, dtypes, shapes) through np.load with pickling disabled."""
    info = _fast_header(data)
    if info is not None:
        dtype, count, offset = info
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return np.load(io.BytesIO(data), allow_pickle=False)


_warned_shards: set[str] = set()  # shards already named in a warning (per process)


def warn_once(url: str, what: str) -> None:
    """One warning per damaged shard and process; every skipped sample is counted in the stream's stats."""
    if url not in _warned_shards:
        _warned_shards.add(url)
        log.warning("shard %s is damaged (%s); its damaged samples are skipped and counted in "
                    "skipped_samples / skipped_shards, this warning is not repeated", url, what)


_HEADERS: dict[bytes, tuple[np.dtype, int]] = {}  # np.save's 1-D integer header bytes -> (dtype, length)


def _fast_header(data: bytes) -> tuple[np.dtype, int, int] | None:
    """(dtype, length, data offset) of np.save's 1-D integer .npy when `data` is exactly that, else None."""
    if data[:8] != _NPY_MAGIC or len(data) < 10:
        return None
    end = 10 + (data[8] | data[9] << 8)
    header = data[10:end]
    known = _HEADERS.get(header)
    if known is None:
        match = _NPY_HEADER.fullmatch(header)
        if match is None:
            return None
        known = (np.dtype(match.group(1).decode()), int(match.group(2)))
        if len(_HEADERS) < 4096:
            _HEADERS[header] = known
    dtype, count = known
    return (dtype, count, end) if len(data) - end == count * dtype.itemsize else None


def _one(sample: RawSample, vocab_size: int, max_len: int) -> np.ndarray | None:
    """One sample's ids, checked, or None (warned) when it is missing, undecodable or out of range.

    Damaged bytes can make numpy's header parser raise almost anything (ValueError, SyntaxError,
    tokenize.TokenError, MemoryError, ...): every exception from decoding is a skipped sample, never a
    traceback."""
    if sample.data is None:
        warn_once(sample.url, f"sample {sample.key} has no {SAMPLE_KEY} member")
        return None
    try:
        ids = load_npy(sample.data)
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or not 2 <= ids.shape[0] <= max_len:
            warn_once(sample.url, f"sample {sample.key} is not a 1-D integer sequence of 2..{max_len} ids")
            return None
        if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
            warn_once(sample.url, f"sample {sample.key} holds ids outside the vocabulary of {vocab_size}")
            return None
    except Exception as e:  # noqa: BLE001 - any decoding failure of damaged bytes is a skipped sample
        warn_once(sample.url, f"sample {sample.key} cannot be decoded ({type(e).__name__}: {e})")
        return None
    return ids


def decode_samples(
    samples: list[RawSample | None], vocab_size: int, max_len: int, stats: ChunkStats
) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of a chunk's samples laid end to end (int64), and each sample's length.

    Samples that are missing (None: counted by the reader), undecodable or out of range are left out;
    the bad ones are counted in `stats` and the first of each shard named in a warning. The common case
    is decoded for the whole chunk at once: np.save's 1-D headers recognised by their exact bytes (np.load
    parses each with ast.literal_eval, ~100 us), one join, one range check. A chunk with anything else
    (another dtype mixed in, a damaged or out-of-range sample) is decoded sample by sample (_one)."""
    present = [s for s in samples if s is not None]
    headers = [None if s.data is None else _fast_header(s.data) for s in present]
    if present and None not in headers and len({h[0] for h in headers}) == 1:
        lengths = np.array([h[1] for h in headers], dtype=np.int64)
        joined = b"".join([memoryview(s.data)[h[2] :] for s, h in zip(present, headers, strict=True)])
        flat = np.frombuffer(joined, dtype=headers[0][0])
        if bool(((lengths >= 2) & (lengths <= max_len)).all()) and 0 <= int(flat.min()) <= int(flat.max()) < vocab_size:
            return flat.astype(np.int64), lengths
    keep = []
    for sample in present:
        ids = _one(sample, vocab_size, max_len)
        if ids is None:
            stats.skipped_samples += 1
        else:
            keep.append(ids.astype(np.int64))
    if not keep:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(keep), np.array([len(k) for k in keep], dtype=np.int64)
