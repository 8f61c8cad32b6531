"""The loader's tar reader against webdataset over tarfile: the same samples from every tar layout those write,
and from damaged archives (truncated anywhere, bytes flipped): never more than webdataset delivers, never a
traceback."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from distil.data_pipeline.stream import tarscan
from distil.data_pipeline.stream.tarscan import TarSamples

SUFFIX = "ids.npy"


def reference(data: bytes) -> list[tuple[str, bytes | None]]:
    """What webdataset yields for the archive (a member it cannot read skipped, reading stopped where
    tarfile stops)."""
    out = []
    stream = wds.tariterators.tar_file_expander([{"stream": io.BytesIO(data), "url": "x"}],
                                                 handler=wds.handlers.ignore_and_continue)
    for sample in wds.tariterators.group_by_keys(stream, handler=wds.handlers.ignore_and_continue):
        out.append((sample["__key__"], sample.get(SUFFIX)))
    return out


class ShortReads(io.BytesIO):
    """A stream that returns fewer bytes than asked, as pipes and sockets do."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__(data)
        self.rng = np.random.default_rng(seed)

    def read(self, n=-1):
        return super().read(int(self.rng.integers(1, 1500)) if n is None or n < 0 else int(self.rng.integers(1, n + 1)))


def scanned(data: bytes, per_read: int = 3, short_reads: int | None = None):
    stream = io.BytesIO(data) if short_reads is None else ShortReads(data, short_reads)
    reader = TarSamples(stream, SUFFIX)
    out = []
    while not reader.done:
        out += reader.read(per_read)
    return out, reader


def tar_of(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT, mtime: float = 0, dirs=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), mtime
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def payload(i: int, n: int = 20) -> bytes:
    out = io.BytesIO()
    np.save(out, np.arange(i, i + n, dtype=np.uint16), allow_pickle=False)
    return out.getvalue()


PLAIN = [(f"{i:06d}.{SUFFIX}", payload(i, 5 + 37 * i % 600)) for i in range(40)]
LAYOUTS = {
    "ustar, one member a sample": tar_of(PLAIN),
    "several members a sample, a sample without ids": tar_of(
        [m for i in range(12) for m in ((f"s{i}.txt", b"hello"), (f"s{i}.{SUFFIX}", payload(i)))][:-1]
        + [("s99.json", b"{}")]),
    "pax headers (float mtime, as webdataset's writer by default)": tar_of(PLAIN[:10], tarfile.PAX_FORMAT, 1.5),
    "gnu long names": tar_of([("d/" + "x" * 120 + f"{i}.{SUFFIX}", payload(i)) for i in range(5)], tarfile.GNU_FORMAT),
    "ustar name prefix": tar_of([("d" * 60 + "/" + "e" * 60 + f"/k{i}.{SUFFIX}", payload(i)) for i in range(5)]),
    "directories, meta files, names without extension, upper-case suffix": tar_of(
        [("__meta__.json", b"{}"), ("noext", b"x"), ("a.IDS.NPY", payload(1)), ("b.ids.npy", payload(2)),
         ("b.ids.npy", payload(3))],
        dirs=("adir",)),
    "a member larger than the read window": tar_of([("big.ids.npy", payload(0, 3000)), *PLAIN[:3]]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_same_samples_as_webdataset(layout, monkeypatch):
    monkeypatch.setattr(tarscan, "_WINDOW", 4096)  # several windows, members across their edges
    data = LAYOUTS[layout]
    got, reader = scanned(data)
    assert got == reference(data) and got
    assert reader.error is None
    for seed in range(5):  # reads that end anywhere, not on block boundaries
        assert scanned(data, short_reads=seed)[0] == got


def test_webdataset_shard_writer_output_reads_back(tmp_path):
    path = tmp_path / "s.tar"
    with wds.ShardWriter(str(tmp_path / "s%d.tar"), encoder=False, verbose=0) as writer:  # float mtime: pax
        for i in range(30):
            writer.write({"__key__": f"k{i:03d}", SUFFIX: payload(i), "txt": b"t"})
    path = tmp_path / "s0.tar"
    got, _ = scanned(path.read_bytes(), per_read=7)
    assert [k for k, _ in got] == [f"k{i:03d}" for i in range(30)]
    assert all(d == payload(i) for i, (_, d) in enumerate(got))


@pytest.mark.parametrize("layout", ["ustar, one member a sample", "pax headers (float mtime, as webdataset's "
                                    "writer by default)", "several members a sample, a sample without ids"])
def test_damaged_archives_deliver_what_webdataset_delivers(layout, monkeypatch):
    monkeypatch.setattr(tarscan, "_WINDOW", 2048)
    data = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    cuts = sorted(set(range(0, len(data), 97)) | {512, 1024, len(data) - 1024})
    cases = [data[:cut] for cut in cuts]
    for position in rng.integers(0, len(data), size=60):
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(8))
        cases.append(bytes(flipped))
    for number, case in enumerate(cases):
        got, reader = scanned(case, short_reads=number if number % 2 else None)
        want = reference(case)
        assert got == want, (len(case), got[-2:], want[-2:])
        if len(got) < len(PLAIN) and layout.startswith("ustar"):
            assert reader.error is not None


def test_a_failing_stream_ends_the_shard_with_its_reason():
    class Failing(io.BytesIO):
        def read(self, n=-1):
            raise OSError("connection reset")

    reader = TarSamples(Failing(), SUFFIX)
    assert reader.read(5) == [] and reader.done and "connection reset" in reader.error


@pytest.mark.parametrize("field", [124, 148])  # size, checksum
@pytest.mark.parametrize("first", [0x80, 0xA0, 0xFF])
def test_base256_numbers_in_damaged_headers_end_the_shard(field, first):
    """GNU tar's base-256 form (first byte 0x80 or 0xff) and bytes that only look like it: tarfile raises
    InvalidHeaderError from its parser for the latter; here the shard ends with a reason instead."""
    data = bytearray(LAYOUTS["ustar, one member a sample"])
    second = 512 + len(PLAIN[0][1]) + (-len(PLAIN[0][1]) % 512)  # the second member's header
    data[second + field] = first
    got, reader = scanned(bytes(data))
    assert got == reference(bytes(data))
    assert len(got) == 1 and reader.error is not None
