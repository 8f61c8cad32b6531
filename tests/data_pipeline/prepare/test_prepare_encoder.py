"""The batched encoder gives the library's ids; worker count never changes the output; the sample corpus."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from prepare_helpers import all_file_bytes, make_documents, run_prepare

from distil.data_pipeline.prepare.sample_corpus import write_sample_corpus
from distil.data_pipeline.prepare.tokenize import Encoder, train_wordpiece

TRICKY = [
    "Hello, World! It's 3.14159 -- isn't it?",
    "tabs\tand\r\nnewlines\nmixed   spaces",
    "control\x00chars\x07inside\x0bwords\x0cand\x1fhere\x7fend",
    "a" * 99 + " " + "b" * 100 + " " + "c" * 101 + " " + "x" * 250,
    "literal [CLS] [SEP] [MASK] [PAD] [UNK] tokens and [mask] lower",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u4e2d\u6587 emoji \U0001f600 done",
    "replacement \ufffd char and zero\u200bwidth space",
    "CamelCaseWords and UPPER and MiXeD123abc 42nd 1,000,000",
    "",
    "   ",
    "#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ punctuation run",
    "words##with##hashes and under_scores and e-mail@example.com",
]


def _random_ascii(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n" + "\x00\x01\x0b\x1b\x7f"
    weights = np.array([8.0 if c.isalpha() else 1.0 for c in alphabet])
    weights /= weights.sum()
    return ["".join(rng.choice(list(alphabet), size=int(rng.integers(0, 200)), p=weights)) for _ in range(n)]


def _random_unicode(rng: np.random.Generator, n: int) -> list[str]:
    pieces = list(string.ascii_letters + string.punctuation + "  \t\n\r") + [
        "\u00e9", "\u00c9", "e\u0301", "\u0301", "\u4e2d", "\u6587", "\u00a0", "\u2028", "\u3000", "\x1c", "\x1f",
        "\u03a3", "\u03c3", "\u0130", "\u00df", "\ufb01", "\u2013", "\u201c", "\U0001f600", "\u200b", "\ufffd",
        "\u0627", "\u05d0", "\u0e01", "\x00", "\x85", "Stra\u00dfe", "\u00bd", "\u2160",
    ]
    return ["".join(rng.choice(pieces, size=int(rng.integers(0, 80)))) for _ in range(n)]


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def tokenizer_json(request) -> str:
    texts = [line for doc in make_documents(60, seed=9) for line in doc] + TRICKY
    tokenizer = train_wordpiece(lambda: [texts], 300)
    backend = tokenizer.backend_tokenizer
    if not request.param:  # a cased BERT pipeline: same model, normalizer without lowercasing
        from tokenizers import normalizers

        backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    return backend.to_str()


def test_encoder_matches_the_library_pipeline(tokenizer_json):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_str(tokenizer_json)
    reference.encode_special_tokens = True
    encoder = Encoder(tokenizer_json)
    assert encoder.spec is not None, "the word-cache path should apply to a BERT WordPiece pipeline"
    rng = np.random.default_rng(0)
    texts = TRICKY + _random_ascii(rng, 300) + _random_unicode(rng, 600)
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert encoder.encode_batch(texts) == expected
    assert encoder.encode_batch(texts) == expected  # again, now from the warm cache


def test_encoder_falls_back_to_the_library_for_other_pipelines():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder = Encoder(tok.to_str())
    assert encoder.spec is None
    assert encoder.encode_batch(["a b c", "b"]) == [[1, 2, 0], [2]]


@pytest.mark.slow
def test_worker_count_does_not_change_the_shards(tmp_path):
    documents = make_documents(300, seed=6)
    (tmp_path / "c.txt").write_text("\n".join(line for doc in documents for line in doc) + "\n")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        result = run_prepare(
            [
                "--input",
                str(tmp_path / "c.txt"),
                "--output",
                str(out),
                "--train-tokenizer",
                "200",
                "--max-seq-len",
                "48",
                "--workers",
                str(workers),
                "--holdout-fraction",
                "0.1",
            ]
        )
        assert result.exit_code == 0, result.stderr
        outputs[workers] = {k: v for k, v in all_file_bytes(out).items() if k != "manifest.json"}
    assert outputs[1] == outputs[2]
    assert any(name.startswith("holdout-") for name in outputs[1])


def test_sample_corpus_is_small_english_and_deterministic(tmp_path: Path):
    count = write_sample_corpus(tmp_path / "a.txt", max_bytes=200_000)
    write_sample_corpus(tmp_path / "b.txt", max_bytes=200_000)
    data = (tmp_path / "a.txt").read_bytes()
    assert data == (tmp_path / "b.txt").read_bytes()
    assert 0 < len(data) <= 200_000
    lines = data.decode("utf-8").splitlines()
    assert len(lines) == count > 100
    assert all(len(line.split()) >= 8 for line in lines)
    assert sum(" the " in line for line in lines) > len(lines) // 2


def test_automatic_worker_count_spares_small_corpora(monkeypatch):
    from distil.data_pipeline.prepare.corpus import Source
    from distil.data_pipeline.prepare.stage import auto_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    small = [Source("a.txt", Path("a.txt"), "text", None, 3 << 20)]
    large = [Source("b.txt", Path("b.txt"), "text", None, 1 << 30)]
    assert auto_workers(small, 1 << 20) == 1
    assert auto_workers(large, 1 << 20) == 4


def test_trained_wordpiece_is_the_same_every_time():
    """The tokenizers trainer alone gives a different vocabulary on most runs here (huggingface/tokenizers#1794)."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "ren", "to", "mi", "sal", "vor", "ed", "li", "qua", "ster", "on", "bri", "dex", "um"]
    texts = [line for doc in make_documents(100, seed=2) for line in doc]
    texts += [" ".join("".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(20)) for _ in range(300)]
    trained = {train_wordpiece(lambda: [texts], 400).backend_tokenizer.to_str() for _ in range(4)}
    assert len(trained) == 1
