"""manifest.json: what a shard set holds, written by `distil prepare` and read by the loader and trainer.

Shard paths are stored relative to the manifest's folder, so a shard set can be moved or served over
http(s) as a whole.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distil.common.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKEN_COUNTS_NAME = "token_counts.npy"
TOKENIZER_DIR_NAME = "tokenizer"
SAMPLE_KEY = "ids.npy"  # each webdataset sample: {"__key__": ..., "ids.npy": token ids incl. [CLS]/[SEP]}


@dataclass
class ShardInfo:
    path: str  # relative to the manifest folder
    samples: int
    tokens: int


@dataclass
class SpecialTokens:
    pad: int
    cls: int
    sep: int
    mask: int
    unk: int

    def ids(self) -> list[int]:
        return [self.pad, self.cls, self.sep, self.mask, self.unk]


@dataclass
class Manifest:
    shards: list[ShardInfo]
    holdout_shards: list[ShardInfo]
    vocab_size: int
    special_tokens: SpecialTokens
    max_len: int
    dtype: str  # "uint16" or "int32"
    tokenizer_name: str
    tokenizer_sha256: str
    tokenizer_dir: str | None = None  # relative folder holding a saved tokenizer, if any
    packed: bool = False
    shuffled: bool = False  # each split written in a random order (seeded by `seed`) rather than corpus order
    seed: int | None = None  # prepare's --seed (held-out choice and shuffle); None in manifests older than it
    sources: list[dict[str, Any]] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        try:
            version = d.get("format_version")
            if version != FORMAT_VERSION:
                raise UserError(
                    f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION}); "
                    "re-run `distil prepare` with this version of distil"
                )
            d = dict(d)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            d["holdout_shards"] = [ShardInfo(**s) for s in d.get("holdout_shards", [])]
            d["special_tokens"] = SpecialTokens(**d["special_tokens"])
            manifest = cls(**d)
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{where}: not a distil shard manifest ({type(e).__name__}: {e})") from None
        problem = manifest.problem()
        if problem:
            raise UserError(f"{where} is damaged ({problem}): re-run `distil prepare` or restore the file")
        return manifest

    def problem(self) -> str | None:
        """What is inconsistent in a loaded manifest (a damaged file), or None."""

        def is_int(x: Any, low: int = 0, high: float = float("inf")) -> bool:
            return type(x) is int and low <= x <= high

        if not is_int(self.vocab_size, 1, 2**31 - 1) or not is_int(self.max_len, 2, 2**20):
            return f"vocab_size {self.vocab_size!r} / max_len {self.max_len!r}"
        if self.dtype not in ("uint16", "int32"):
            return f"dtype {self.dtype!r} is not uint16 or int32"
        if not all(is_int(i, 0, self.vocab_size - 1) for i in self.special_tokens.ids()):
            return f"special_tokens {self.special_tokens} are not ids below vocab_size {self.vocab_size}"
        for s in [*self.shards, *self.holdout_shards]:
            if not isinstance(s.path, str) or not s.path or not is_int(s.samples) or not is_int(s.tokens):
                return f"shard entry {s} is not a path with sample and token counts"
            if not 2 * s.samples <= s.tokens <= s.samples * self.max_len:
                return f"shard {s.path}: {s.tokens} tokens cannot be {s.samples} samples of 2..{self.max_len}"
        for name in ("tokenizer_name", "tokenizer_sha256"):
            if not isinstance(getattr(self, name), str):
                return f"{name} is not a string"
        if self.tokenizer_dir is not None and not isinstance(self.tokenizer_dir, str):
            return "tokenizer_dir is not a string"
        if not isinstance(self.sources, list) or not isinstance(self.command, list):
            return "sources / command are not lists"
        if not isinstance(self.stats, dict):
            return "stats is not a mapping"
        return None


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://", "pipe:"))


def manifest_location(location: str | os.PathLike) -> str:
    """Accepts a shard folder, a manifest path or an http(s) URL to either; returns the manifest's location."""
    loc = str(location)
    if loc.endswith(".json"):
        return loc
    if is_remote(loc):
        return loc.rstrip("/") + "/" + MANIFEST_NAME
    return str(Path(loc) / MANIFEST_NAME)


def base_of(manifest_loc: str) -> str:
    """The folder (or URL prefix) that shard paths in the manifest are relative to."""
    if is_remote(manifest_loc):
        return manifest_loc.rsplit("/", 1)[0]
    return str(Path(manifest_loc).parent)


def load_manifest(location: str | os.PathLike) -> tuple[Manifest, str]:
    """Returns the manifest and the base that its shard paths are relative to."""
    loc = manifest_location(location)
    try:
        if loc.startswith(("http://", "https://")):
            with urllib.request.urlopen(loc, timeout=30) as r:  # noqa: S310 - user-given shard URL
                raw = r.read().decode("utf-8")
        else:
            raw = Path(loc).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{loc} is not UTF-8 text ({e.reason} at byte {e.start}); re-run `distil prepare`") from None
    except FileNotFoundError:
        raise UserError(f"no shard manifest at {loc}: point --shards at a folder made by `distil prepare`") from None
    except OSError as e:
        raise UserError(f"cannot read shard manifest {loc}: {e}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise json.JSONDecodeError("not a JSON object", raw, 0)
    except json.JSONDecodeError as e:
        raise UserError(f"{loc} is not valid JSON ({e}); re-run `distil prepare`") from None
    return Manifest.from_dict(data, where=loc), base_of(loc)


def shard_url(base: str, shard: ShardInfo) -> str:
    if is_remote(base):
        return base.rstrip("/") + "/" + shard.path
    return str(Path(base) / shard.path)
