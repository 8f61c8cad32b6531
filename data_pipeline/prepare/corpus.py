"""Reading raw corpora: which files, in which order, and the documents inside them.

A document is a list of text segments (non-empty, stripped lines). Without `--pack` every segment becomes
its own sequence, as the original's "one sequence per input line"; with `--pack` consecutive segments of a
document share a sequence.

Formats: plain text (one document per line, or blank-line-separated documents whose lines are the
segments), JSONL (a text field per row), Parquet (a text column); each may be .gz or .zst compressed except
Parquet, which compresses internally. Everything is read in a fixed order (inputs as given, directory and
glob members sorted), so the same inputs always yield the same documents.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from distil.common.errors import UserError

DocSeparator = Literal["line", "blank-line"]
DOC_SEPARATORS: tuple[str, ...] = ("line", "blank-line")
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_COMPRESSION_SUFFIXES = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Source:
    """One input file. `name` is the path as the user wrote it (or the member path under their folder)."""

    name: str
    path: Path
    format: Literal["text", "jsonl", "parquet"]
    compression: Literal["gz", "zst"] | None
    bytes: int

    def describe(self) -> dict[str, object]:
        return {"path": self.name, "format": self.format, "compression": self.compression, "bytes": self.bytes}


@dataclass
class ReadStats:
    documents: int = 0
    segments: int = 0
    replaced_utf8: int = 0  # invalid UTF-8 byte sequences replaced by U+FFFD


def _classify(path: Path) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes and not compression else "")
    if inner in _JSONL_SUFFIXES:
        return "jsonl", compression
    if inner in _PARQUET_SUFFIXES:
        if compression:
            raise UserError(f"{path}: Parquet compresses internally; pass the .parquet file without {suffixes[-1]}")
        return "parquet", None
    return "text", compression


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _expand(pattern: str) -> list[tuple[str, Path]]:
    """Files named by one --input value: a file, a folder (recursive, hidden entries skipped) or a glob."""
    path = Path(pattern)
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
        files = [(m, Path(m)) for m in matches if Path(m).is_file()]
        if not files:
            raise UserError(f"--input {pattern}: the pattern matches no files")
        return files
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path))),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise UserError(f"--input {pattern}: the folder holds no files")
        return [(os.path.join(pattern, p.relative_to(path).as_posix()), p) for p in files]
    if not path.exists():
        raise UserError(f"--input {pattern}: no such file or folder")
    if not path.is_file():
        raise UserError(f"--input {pattern}: not a regular file or folder")
    return [(pattern, path)]


def resolve_sources(inputs: Sequence[str], exclude: Path | None = None) -> list[Source]:
    """Expands the inputs into files in a fixed order; a file named twice is read once, files under
    `exclude` (the output folder, when it lies inside an input folder) not at all."""
    if not inputs:
        raise UserError("no input given: pass --input PATH (files, folders or globs)")
    sources: list[Source] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None
    for pattern in inputs:
        for name, path in _expand(str(pattern)):
            real = path.resolve()
            if real in seen or (excluded is not None and real.is_relative_to(excluded)):
                continue
            seen.add(real)
            fmt, compression = _classify(path)
            try:
                size = path.stat().st_size
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise UserError(f"cannot read {name}: {e.strerror or e}") from None
            sources.append(Source(name, path, fmt, compression, size))  # type: ignore[arg-type]
    return sources


def _open_binary(source: Source) -> BinaryIO:
    raw = open(source.path, "rb")  # noqa: SIM115 - closed by the caller through the returned stream
    if source.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if source.compression == "zst":
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type,return-value]
    return raw


def _decode(line: bytes, stats: ReadStats) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        replaced = line.decode("utf-8", errors="replace")
        kept = line.decode("utf-8", errors="ignore")
        stats.replaced_utf8 += replaced.count("\ufffd") - kept.count("\ufffd")
        return replaced


def _lines(source: Source, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a text or JSONL source; refuses binary content."""
    try:
        with _open_binary(source) as f:
            head = f.peek(_SNIFF_BYTES)[:_SNIFF_BYTES] if hasattr(f, "peek") else b""
            if b"\x00" in head:
                raise UserError(
                    f"{source.name} looks binary (it holds NUL bytes): pass plain text, JSONL or Parquet files"
                )
            for number, line in enumerate(f, start=1):
                if b"\x00" in line:
                    raise UserError(f"{source.name}:{number}: binary data (NUL bytes) in a text file")
                yield number, _decode(line, stats)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise UserError(f"cannot read {source.name}: {e}") from None


def _segments(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def _text_documents(source: Source, separator: DocSeparator, stats: ReadStats) -> Iterator[list[str]]:
    if separator == "line":
        for _, line in _lines(source, stats):
            segment = line.strip()
            if segment:
                yield [segment]
        return
    document: list[str] = []
    for _, line in _lines(source, stats):
        segment = line.strip()
        if segment:
            document.append(segment)
        elif document:
            yield document
            document = []
    if document:
        yield document


def _jsonl_documents(source: Source, text_field: str, stats: ReadStats) -> Iterator[list[str]]:
    for number, line in _lines(source, stats):
        if number == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{source.name}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            raise UserError(f"{source.name}:{number}: the row has no {text_field!r} field; pass --text-field NAME")
        text = row[text_field]
        if not isinstance(text, str):
            raise UserError(
                f"{source.name}:{number}: field {text_field!r} holds {type(text).__name__}, not text; "
                "pass --text-field NAME of a string field"
            )
        segments = _segments(text)
        if segments:
            yield segments


def _parquet_documents(source: Source, text_field: str) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open(source.path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise UserError(f"{source.name} is not a Parquet file (no PAR1 magic); check the file or its suffix")
        pf = pq.ParquetFile(source.path)
        if text_field not in pf.schema_arrow.names:
            raise UserError(
                f"{source.name}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                "pass --text-field NAME"
            )
        column_type = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UserError(f"{source.name}: column {text_field!r} is {column_type}, not text; pass --text-field NAME")
        for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    segments = _segments(text)
                    if segments:
                        yield segments
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {source.name}: {e}") from None


def iter_documents(
    sources: Sequence[Source],
    *,
    separator: DocSeparator = "line",
    text_field: str = "text",
    stats: ReadStats | None = None,
) -> Iterator[list[str]]:
    """All documents of all sources in order; each is a non-empty list of non-empty segments."""
    stats = stats if stats is not None else ReadStats()
    for source in sources:
        if source.format == "parquet":
            documents = _parquet_documents(source, text_field)
        elif source.format == "jsonl":
            documents = _jsonl_documents(source, text_field, stats)
        else:
            documents = _text_documents(source, separator, stats)
        for document in documents:
            stats.documents += 1
            stats.segments += len(document)
            yield document
