"""`distil prepare` with the tokenizers of every family: a byte-level BPE (RoBERTa) it trains itself, an XLM-R
SentencePiece Unigram given by folder, and a 250,002-entry vocabulary whose ids need 32 bits. Each gives the
library's own ids, uses the tokenizer's own special ids, and never turns literal special-token text into
structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from family_tokenizers import XLMR_VOCAB, bpe_tokenizer, large_unigram_tokenizer, unigram_tokenizer
from prepare_helpers import WORDS, make_documents, manifest_of, read_split, run_prepare

from distil.data_pipeline.masking import IGNORE_INDEX, MaskingConfig
from distil.data_pipeline.prepare.tokenize import chunk_sequence, drop_reason
from distil.data_pipeline.stream.loader import PretrainStream

MAX_LEN = 48


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return [line for doc in make_documents(80, seed=5) for line in doc]


def write_corpus(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def library_sequences(tokenizer_dir: Path, lines: list[str]) -> list[list[int]]:
    """`<s> ids </s>` of each line by the library's own pipeline (specials in the text kept as text), chunked
    and filtered by the recipe's rules (tested on their own in test_prepare.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True
    out = []
    for text in lines:
        ids = [tok.cls_token_id, *backend.encode(text, add_special_tokens=False).ids, tok.sep_token_id]
        chunks = chunk_sequence(ids, tok.cls_token_id, tok.sep_token_id, MAX_LEN)
        out += [chunk for chunk in chunks if drop_reason(chunk, tok.unk_token_id) is None]
    return out


def shard_sequences(folder: Path) -> list[list[int]]:
    return [ids.tolist() for _, ids in read_split(folder)]


def prepare(tmp_path: Path, corpus: Path, *args: str) -> Path:
    out = tmp_path / "shards"
    result = run_prepare(["--input", str(corpus), "--output", str(out), "--max-seq-len", str(MAX_LEN),
                          "--workers", "1", "--no-shuffle", *args])
    assert result.exit_code == 0, result.output
    return out


def test_a_trained_byte_level_bpe_has_robertas_layout_and_is_reproducible(tmp_path, lines):
    corpus = write_corpus(tmp_path / "c.txt", lines)
    args = ("--train-tokenizer", "300", "--train-tokenizer-kind", "bpe")
    first = prepare(tmp_path, corpus, *args)
    manifest = manifest_of(first)
    tokenizer = json.loads((first / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE" and tokenizer["pre_tokenizer"]["type"] == "ByteLevel"
    assert (manifest.special_tokens.cls, manifest.special_tokens.pad, manifest.special_tokens.sep) == (0, 1, 2)
    assert manifest.special_tokens.mask == manifest.vocab_size - 1 == 299
    assert manifest.tokenizer_name == "byte-level-bpe-300-trained"
    assert "--train-tokenizer-kind bpe" in " ".join(manifest.command)
    kept = library_sequences(first / "tokenizer", lines)
    assert sorted(shard_sequences(first)) == sorted(kept) and len(kept) > 50
    again = tmp_path / "again"
    first.rename(again)
    second = prepare(tmp_path, corpus, *args)
    for name in ("tokenizer/tokenizer.json", "manifest.json", "train-000000.tar"):
        assert (second / name).read_bytes() == (again / name).read_bytes(), name


def test_an_xlmr_style_unigram_tokenizer_gives_the_librarys_ids(tmp_path, lines):
    tokenizer_dir = unigram_tokenizer(tmp_path / "xlmr", lines)
    corpus = write_corpus(tmp_path / "c.txt", lines)
    out = prepare(tmp_path, corpus, "--tokenizer", str(tokenizer_dir))
    manifest = manifest_of(out)
    assert json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    assert (manifest.special_tokens.cls, manifest.special_tokens.pad, manifest.special_tokens.sep) == (0, 1, 2)
    assert sorted(shard_sequences(out)) == sorted(library_sequences(tokenizer_dir, lines))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_special_token_text_in_the_corpus_stays_text(tmp_path, lines, kind):
    """A Unigram model holds "<s>" as a piece and would give the special id for it; distil encodes it as text."""
    tokenizer_dir = (bpe_tokenizer if kind == "bpe" else unigram_tokenizer)(tmp_path / kind, lines)
    injected = [f"{line} <s> </s> <mask> <pad> {line}" for line in lines[:20]]
    out = prepare(tmp_path, write_corpus(tmp_path / "c.txt", injected), "--tokenizer", str(tokenizer_dir))
    sp = manifest_of(out).special_tokens
    sequences = shard_sequences(out)
    assert len(sequences) >= 10
    for ids in sequences:
        inner = ids[1:-1]
        assert ids[0] == sp.cls and ids[-1] == sp.sep
        assert not {sp.cls, sp.sep, sp.pad, sp.mask} & set(inner), ids


def test_a_250k_vocabulary_is_stored_and_read_exactly(tmp_path):
    """ids above 65,535 are stored as int32 and come back unchanged; masking uses the tokenizer's own
    <mask> (id 250,001), and labels keep the real ids."""
    tokenizer_dir = large_unigram_tokenizer(tmp_path / "big", list(WORDS))
    lines = [line for doc in make_documents(60, seed=9, min_words=12, max_words=30) for line in doc]
    out = prepare(tmp_path, write_corpus(tmp_path / "c.txt", lines), "--tokenizer", str(tokenizer_dir))
    manifest = manifest_of(out)
    assert manifest.vocab_size == XLMR_VOCAB and manifest.dtype == "int32"
    assert manifest.special_tokens.mask == XLMR_VOCAB - 1
    sequences = shard_sequences(out)
    assert sorted(sequences) == sorted(library_sequences(tokenizer_dir, lines))
    inner = np.concatenate([np.array(ids[1:-1]) for ids in sequences])
    assert inner.min() > 65_535, "every word id of this vocabulary needs more than 16 bits"
    counts = np.load(out / "token_counts.npy")
    assert counts.shape == (XLMR_VOCAB,) and counts[inner].min() > 0 and counts.sum() >= inner.size

    stream = PretrainStream(str(out), batch_size=8, shuffle_buffer=8, masking=MaskingConfig(), seed=3)
    stream.set_epoch(0)
    seen_mask = False
    for batch in stream:
        ids, labels = batch["input_ids"], batch["labels"]
        masked = labels != IGNORE_INDEX
        assert labels[masked].min() > 65_535  # specials are never chosen; words keep their 32-bit ids
        seen_mask |= bool((ids[masked] == XLMR_VOCAB - 1).any())
        assert ids.dtype == torch.long and int(ids.max()) < XLMR_VOCAB
    assert seen_mask
