"""Writing a shard set: webdataset tar shards, token counts, manifest, and moving it into place.

Reproducible bytes: tar members get mtime 0 and fixed owner names (webdataset's TarWriter defaults, uid/gid
0), samples are keyed by their index, and the manifest holds no time or temporary path. A shard set is
built in a hidden temporary folder beside the output and renamed into place only when complete, with
manifest.json written last inside it.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_pipeline.errors import UserError
from data_pipeline.manifest import MANIFEST_NAME, SAMPLE_KEY, TOKEN_COUNTS_NAME, Manifest, ShardInfo

TAR_BLOCK = 512
UINT16_VOCAB_LIMIT = 1 << 16


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.int32)


@lru_cache(maxsize=4096)
def _npy_header(length: int, dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(length, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()[: -length * np.dtype(dtype).itemsize or None]


def npy_bytes(ids: np.ndarray) -> bytes:
    """The .npy file of a 1-d array (what np.save writes), with the header cached per length and dtype."""
    return _npy_header(len(ids), ids.dtype.str) + ids.tobytes()


def _tar_entry_bytes(payload: int) -> int:
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


def _use_ustar(writer) -> None:
    """Plain ustar headers: the same bytes as tarfile's default (pax) for our short ASCII member names, minus
    the per-member pax checks (about 10 % of the write time). webdataset's TarWriter takes a `format`
    argument but does not pass it on to tarfile, hence this."""
    tar = getattr(getattr(writer, "tarstream", None), "tarstream", None)
    if isinstance(tar, tarfile.TarFile):
        tar.format = tarfile.USTAR_FORMAT


class ShardSetWriter:
    """Writes `{prefix}-NNNNNN.tar` shards of about `target_bytes` each and records what each holds."""

    def __init__(self, folder: Path, prefix: str, target_bytes: int) -> None:
        self.folder = folder
        self.prefix = prefix
        self.target_bytes = target_bytes
        self.shards: list[ShardInfo] = []
        self._writer = None
        self._bytes = 0
        self.total_samples = 0

    def _start_shard(self) -> None:
        import webdataset as wds

        if self._writer is None:
            # Rolling is decided here from the real tar size, so ShardWriter's own limits are disabled.
            self._writer = wds.ShardWriter(
                str(self.folder / f"{self.prefix}-%06d.tar"),
                maxcount=1 << 62,
                maxsize=float("inf"),
                verbose=0,
                encoder=False,
                mtime=0,
            )
        else:
            self._writer.next_stream()
        _use_ustar(self._writer)
        self.shards.append(ShardInfo(path=f"{self.prefix}-{len(self.shards):06d}.tar", samples=0, tokens=0))
        self._bytes = 0

    def write(self, sample_npy: bytes, tokens: int) -> None:
        """Appends one sample, keyed by its index in this shard set."""
        size = _tar_entry_bytes(len(sample_npy))
        if self._writer is None or (self._bytes and self._bytes + size > self.target_bytes):
            self._start_shard()
        self._writer.write({"__key__": f"{self.total_samples:012d}", SAMPLE_KEY: sample_npy})
        shard = self.shards[-1]
        shard.samples += 1
        shard.tokens += tokens
        self._bytes += size
        self.total_samples += 1

    def close(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shards


def save_token_counts(folder: Path, counts: np.ndarray) -> None:
    np.save(folder / TOKEN_COUNTS_NAME, counts.astype(np.int64), allow_pickle=False)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")


# ---------------------------------------------------------------- output folder


def _looks_like_shard_set(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).exists() or any(folder.glob("*.tar"))


def check_output(output: Path, overwrite: bool) -> None:
    """Refuses an output that would lose data; called before any work and again before publishing."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder path")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not _looks_like_shard_set(output):
        raise UserError(f"--output {output} is a non-empty folder that holds no shard set; pass a new or empty folder")
    if not overwrite:
        raise UserError(f"--output {output} already holds shards; pass --overwrite to replace them")


def make_temp_folder(output: Path) -> Path:
    """A hidden work folder beside the output (same filesystem, so the final rename is atomic)."""
    parent = output.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
        temp.chmod(0o755)  # mkdtemp makes it private; the published shard set should be readable like any folder
        return temp
    except OSError as e:
        raise UserError(f"cannot create a work folder beside --output {output}: {e.strerror or e}") from None


def publish(temp: Path, output: Path, overwrite: bool) -> None:
    """Moves the finished shard set into place; an old one is replaced only with `overwrite`."""
    check_output(output, overwrite)
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        temp.rename(output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.absolute().parent))
    old.rmdir()
    output.rename(old)
    temp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
