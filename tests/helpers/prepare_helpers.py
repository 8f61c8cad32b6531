"""Helpers for the `distil prepare` tests: a tiny corpus, a tokenizer trained on it, CLI runs, shard reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import webdataset as wds
from click.testing import CliRunner, Result

from distil.data_pipeline.manifest import SAMPLE_KEY, Manifest, load_manifest
from distil.data_pipeline.prepare.tokenize import train_wordpiece
from distil.pretrain.cli import main

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potent elixirs "
    "under an amber moon and distant rivers carry stories of ancient kingdoms toward the sea"
).split()


def make_documents(
    count: int, seed: int = 0, min_lines: int = 1, max_lines: int = 4, min_words: int = 5, max_words: int = 60
) -> list[list[str]]:
    """Documents of a few lines each, lines of 5..60 words by default (some longer than a small max_len)."""
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        lines = []
        for _ in range(int(rng.integers(min_lines, max_lines + 1))):
            n = int(rng.integers(min_words, max_words + 1))
            words = [WORDS[i] for i in rng.integers(0, len(WORDS), n)]
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + ".")
        documents.append(lines)
    return documents


def build_tokenizer(folder: Path, vocab_size: int = 200) -> Path:
    documents = make_documents(50, seed=123)
    tokenizer = train_wordpiece(lambda: [[line for doc in documents for line in doc]], vocab_size)
    tokenizer.save_pretrained(str(folder))
    return folder


def run_prepare(args: list[str]) -> Result:
    return CliRunner().invoke(main, ["prepare", "--quiet", *args], catch_exceptions=False)


def read_split(folder: Path, holdout: bool = False) -> list[tuple[str, np.ndarray]]:
    """(key, ids) of every sample of the train (or held-out) shards, decoded with webdataset."""
    manifest, base = load_manifest(folder)
    infos = manifest.holdout_shards if holdout else manifest.shards
    urls = [str(Path(base) / s.path) for s in infos]
    if not urls:
        return []
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return [(sample["__key__"], sample[SAMPLE_KEY]) for sample in dataset]


def manifest_of(folder: Path) -> Manifest:
    return load_manifest(folder)[0]


def expected_sequences(tokenizer_dir: Path, segments: list[str], max_len: int) -> list[list[int]]:
    """What the recipe gives for one-sequence-per-segment, computed with the library's full pipeline."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    cls_id, sep_id, unk_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), tok.token_to_id("[UNK]")
    out = []
    for text in segments:
        ids = [cls_id, *tok.encode(text, add_special_tokens=False).ids, sep_id]
        chunks = [ids] if len(ids) <= max_len else []
        if not chunks:
            for start in range(0, len(ids), max_len - 2):
                chunk = ids[start : start + max_len - 2]
                chunk = chunk if chunk[0] == cls_id else [cls_id, *chunk]
                chunk = chunk if chunk[-1] == sep_id else [*chunk, sep_id]
                chunks.append(chunk)
        out += [c for c in chunks if len(c) > 11 and c.count(unk_id) / len(c) < 0.5]
    return out


def all_file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
