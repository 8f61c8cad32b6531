"""Reading webdataset tar shards sample by sample, parsing the tar headers directly.

A shard is a tar archive in which consecutive members sharing a key (the member's path up to the first dot
of its file name) form one sample; the loader needs one member of each (`ids.npy`). tarfile plus
webdataset's grouping cost about 60 us a sample, most of the loader's budget when sequences are short.
This reader reads the stream in large blocks and takes only what it needs from each 512-byte header
(name, size, type, checksum; the checksums of a block's plain members checked together with numpy), at
about 4 us a sample (BENCHMARKS.md).

It follows tarfile and webdataset where they decide something: regular files ('0' or NUL type) are
members, other entries are passed over; a pax extended header ('x') sets the next member's path and size,
a GNU long name ('L') its name; names matching webdataset's metadata pattern (`__...__`) are skipped; a
member whose name has no extension is ignored; a second member with the same suffix in one sample is
dropped. A zero block ends the archive. A header whose checksum or size field is wrong, or a stream that
ends inside a member, ends the shard there: what came before is delivered and `error` says why the rest
is not (the caller counts the samples it was owed).
"""

from __future__ import annotations

import re
from typing import BinaryIO

import numpy as np

TAR_BLOCK = 512
_WINDOW = 1 << 20  # bytes read from the stream at a time
_REGULAR = (ord("0"), 0, ord("7"))  # regular file, old-style regular file, contiguous file
_PAX, _GNU_LONGNAME, _GLOBAL_PAX = ord("x"), ord("L"), ord("g")
_USTAR = b"ustar\x0000"
_SKIP_META = re.compile(rb"__[^/]*__($|/)")  # webdataset's skip_meta
_PAX_RECORD = re.compile(rb"(\d+) ")


class ShardEnded(Exception):
    """The shard cannot be read past this point (damaged header, truncated stream)."""


def _number(field: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded), or base-256 for large values (tarfile.nti)."""
    if field and field[0] & 0x80:  # GNU base-256: 0x80 then a big-endian number, 0xff a negative one
        if field[0] not in (0x80, 0xFF):
            raise ShardEnded(f"invalid number {field!r} in a tar header")
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else value - 256 ** (len(field) - 1)
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ShardEnded(f"invalid number {field!r} in a tar header") from None


def _checksum_ok(header: bytes) -> bool:
    """The stored checksum equals the header's byte sum with the checksum field as spaces; as tarfile, a
    sum of signed bytes (some old tar programs) is accepted too."""
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """key=value records of a pax extended header ("LEN key=value\\n" each)."""
    records, pos = {}, 0
    while pos < len(data):
        match = _PAX_RECORD.match(data, pos)
        if match is None or int(match.group(1)) <= 0:
            raise ShardEnded("malformed pax header")
        end = pos + int(match.group(1))
        key, sep, value = data[match.end() : end - 1].partition(b"=")
        if not sep or end > len(data):
            raise ShardEnded("malformed pax header")
        records[key] = value
        pos = end
    return records


def _first_bad_checksum(buf: bytes, starts: list[int]) -> int | None:
    """Index into `starts` (header offsets in `buf`, multiples of 512) of the first header whose checksum
    is wrong, checked for all of them at once; None if all are right."""
    blocks = np.frombuffer(buf, dtype=np.uint8, count=len(buf) // TAR_BLOCK * TAR_BLOCK).reshape(-1, TAR_BLOCK)
    rows = blocks[np.asarray(starts) // TAR_BLOCK]
    field = rows[:, 148:156].astype(np.int64)
    computed = rows.sum(axis=1, dtype=np.int64) - field.sum(axis=1) + 8 * 32
    digits = field[:, :6] - 48
    # tarfile and GNU tar write six octal digits, NUL, space; anything else is checked by _checksum_ok
    plain = ((digits >= 0) & (digits < 8)).all(axis=1) & (field[:, 6] == 0)
    stored = (digits * (8 ** np.arange(5, -1, -1))).sum(axis=1)
    for i in np.flatnonzero(~(plain & (stored == computed))).tolist():
        try:
            if not _checksum_ok(bytes(rows[i])):
                return i
        except ShardEnded:  # not even a number in the checksum field
            return i
    return None


class TarSamples:
    """The samples of one tar stream, in order, as (key, bytes of the `suffix` member or None): `read(n)`."""

    def __init__(self, stream: BinaryIO, suffix: str) -> None:
        self._stream = stream
        self._suffix = suffix.lower().encode("utf-8")
        self._buf = b""
        self._pos = 0  # the next header's offset in _buf (always a multiple of 512 from the tar's start)
        self._eof = False
        self._pax: dict[bytes, bytes] = {}  # pending pax extended header records for the next member
        self._long_name: bytes | None = None  # pending GNU long name for the next member
        self._broken: str | None = None  # damage found after members that were delivered before it
        self._key: bytes | None = None  # the sample being assembled: its key and member
        self._data: bytes | None = None
        self._has_data = False
        self._ready: list[tuple[str, bytes | None]] = []  # samples assembled, not yet handed out
        self.done = False
        self.error: str | None = None  # why the shard ended before its end-of-archive marker

    # ---------------------------------------------------------------- bytes

    def _available(self, need: int) -> bool:
        """At least `need` bytes from the current position are in the buffer (False: the stream ended)."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        parts = [self._buf[self._pos :]]
        while have < need and not self._eof:
            block = self._stream.read(max(_WINDOW, need - have))
            if not block:
                self._eof = True
                break
            parts.append(block)
            have += len(block)
        self._buf, self._pos = b"".join(parts), 0
        return have >= need

    def _skip(self, count: int, strict: bool = True) -> None:
        """Moves `count` bytes on; the stream ending first raises ShardEnded if `strict` (member data), else
        leaves the end to the next header read (a member's padding cut off: its data is whole, as tarfile)."""
        have = len(self._buf) - self._pos
        if have >= count:
            self._pos += count
            return
        count -= have
        self._buf, self._pos = b"", 0
        while count > 0:  # a large member not needed: read past it
            block = self._stream.read(min(count, _WINDOW))
            if not block:
                self._eof = True
                if strict:
                    raise ShardEnded("the stream ends inside a tar member")
                return
            count -= len(block)

    # ---------------------------------------------------------------- members

    def _scan(self) -> list[tuple[bytes, bytes | None]] | None:
        """The next members as (name, data or None): data only for names ending in the suffix. None at the
        end of the archive. Plain ustar regular members that lie whole in the buffer are taken in one loop
        with their checksums checked together; anything else goes through _general_member."""
        if self._broken is not None:
            raise ShardEnded(self._broken)
        if not self._available(TAR_BLOCK):
            if len(self._buf) > self._pos:
                raise ShardEnded("the stream ends inside a tar header")
            self.error = "the stream ends without the tar end-of-archive marker"  # tarfile: a clean end
            return None
        buf, pos, end, suffix = self._buf, self._pos, len(self._buf), self._suffix
        starts: list[int] = []
        members: list[tuple[bytes, bytes | None]] = []
        while pos + TAR_BLOCK <= end and not self._pax and self._long_name is None:
            if buf[pos + 156] not in (48, 0) or buf[pos] == 0 or buf[pos + 345] != 0:
                break  # not a plain regular member, or the end marker, or a ustar name prefix
            try:
                size = int(buf[pos + 124 : pos + 135], 8)
            except ValueError:
                break
            stop = pos + TAR_BLOCK + size
            following = stop + (-size % TAR_BLOCK)
            if following > end:
                break  # the member (or its padding) runs past the buffer
            name = buf[pos : pos + 100]
            cut = name.find(0)
            if cut >= 0:
                name = name[:cut]
            starts.append(pos)
            members.append((name, buf[pos + TAR_BLOCK : stop] if name.lower().endswith(suffix) else None))
            pos = following
        if not starts:
            return self._general_member()
        bad = _first_bad_checksum(buf, starts)
        if bad is not None:
            self._broken = "a tar header with a wrong checksum"
            del members[bad:]
        self._pos = pos
        return members

    def _general_member(self) -> list[tuple[bytes, bytes | None]] | None:
        """One header at the current position, by all the rules of the module docstring."""
        header = self._buf[self._pos : self._pos + TAR_BLOCK]
        if not any(header):  # the end-of-archive marker (tarfile stops at the first zero block too)
            return None
        if not _checksum_ok(header):
            raise ShardEnded("a tar header with a wrong checksum")
        size = _number(header[124:136])
        if size < 0:
            raise ShardEnded("a tar header with a negative size")
        kind = header[156]
        name = header[:100].split(b"\0", 1)[0]
        if header[257:265] == _USTAR and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if self._pax:
            name = self._pax.get(b"path", name)
            if b"size" in self._pax:
                size = int(self._pax[b"size"]) if self._pax[b"size"].isdigit() else -1
                if size < 0:
                    raise ShardEnded("a pax header with an invalid size")
        if self._long_name is not None:
            name = self._long_name
        data = None
        if kind in (_PAX, _GNU_LONGNAME, _GLOBAL_PAX) or (kind in _REGULAR and name.lower().endswith(self._suffix)):
            if not self._available(TAR_BLOCK + size):
                raise ShardEnded("the stream ends inside a tar member")
            data = self._buf[self._pos + TAR_BLOCK : self._pos + TAR_BLOCK + size]
        self._skip(TAR_BLOCK + size)
        self._skip(-size % TAR_BLOCK, strict=False)
        if kind == _PAX:
            self._pax = _pax_records(data)
            return []
        if kind == _GNU_LONGNAME:
            self._long_name = data.split(b"\0", 1)[0]
            return []
        self._pax, self._long_name = {}, None
        return [(name, data)] if kind in _REGULAR else []

    # ---------------------------------------------------------------- samples

    def read(self, count: int) -> list[tuple[str, bytes | None]]:
        """Up to `count` more samples as (key, member bytes or None if the sample has no such member);
        fewer only at the end of the shard (then `done` is set, and `error` if it was damaged). On damage
        the samples before it are delivered, the one being assembled included (as webdataset over tarfile
        does: its complete members are read)."""
        ready = self._ready
        while len(ready) < count and not self.done:
            try:
                members = self._scan()
            except ShardEnded as e:
                self.error, members = str(e), None
            except (OSError, ValueError) as e:  # the stream itself failed (a pipe: command, a network read)
                self.error, members = f"{type(e).__name__}: {e}", None
            if members is None:
                self.done = True
                if self._key is not None:
                    ready.append((self._key.decode("utf-8", "replace"), self._data))
                    self._key = None
                break
            for name, data in members:
                if name.startswith(b"__") and _SKIP_META.match(name):
                    continue
                slash = name.rfind(b"/")
                dot = name.find(b".", slash + 1)
                if dot <= slash + 1:  # no extension, or an empty base name: not part of a sample
                    continue
                key = name[:dot]
                if key != self._key:
                    if self._key is not None:
                        ready.append((self._key.decode("utf-8", "replace"), self._data))
                    self._key, self._data, self._has_data = key, None, False
                if data is not None and not self._has_data and name[dot + 1 :].lower() == self._suffix:
                    self._data, self._has_data = data, True
        out, self._ready = ready[:count], ready[count:]
        return out
