"""`distil prepare`: every input format round-trips to the ids the tokenizer gives; sequence rules; outputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from prepare_helpers import (
    all_file_bytes,
    expected_sequences,
    make_documents,
    manifest_of,
    read_split,
    run_prepare,
)

from distil.data_pipeline.manifest import TOKEN_COUNTS_NAME, TOKENIZER_DIR_NAME
from distil.data_pipeline.prepare.shards import ids_dtype, npy_bytes
from distil.data_pipeline.prepare.tokenize import chunk_sequence, document_sequences, drop_reason

MAX_LEN = 48


@pytest.fixture(scope="module")
def documents() -> list[list[str]]:
    return make_documents(40, seed=1)


def _lines(documents: list[list[str]]) -> list[str]:
    return [line for doc in documents for line in doc]


def _write_text(path: Path, documents: list[list[str]], blank_line: bool = False) -> None:
    sep = "\n\n" if blank_line else "\n"
    text = sep.join("\n".join(doc) for doc in documents) + "\n"
    data = text.encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def _write_jsonl(path: Path, documents: list[list[str]], field: str = "text") -> None:
    data = "".join(json.dumps({"id": i, field: "\n".join(doc)}) + "\n" for i, doc in enumerate(documents)).encode()
    if path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    elif path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _write_parquet(path: Path, documents: list[list[str]], column: str = "text") -> None:
    pq.write_table(pa.table({column: ["\n".join(doc) for doc in documents]}), path)


def _prepare_ok(inputs: list[str], out: Path, tokenizer_dir: Path, *extra: str) -> None:
    """Corpus order (--no-shuffle), so the shards can be compared with the expected sequences in order;
    the shuffle has its own tests (test_prepare_shuffle.py)."""
    result = run_prepare(
        ["--input", *inputs, "--output", str(out), "--tokenizer", str(tokenizer_dir),
         "--max-seq-len", str(MAX_LEN), "--workers", "1", "--no-shuffle", *extra]
    )
    assert result.exit_code == 0, result.output + result.stderr


def _ids(folder: Path, holdout: bool = False) -> list[list[int]]:
    return [ids.tolist() for _, ids in read_split(folder, holdout)]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "name, writer, extra",
    [
        ("corpus.txt", _write_text, []),
        ("corpus.txt.gz", _write_text, []),
        ("corpus.txt.zst", _write_text, []),
        ("corpus.jsonl", _write_jsonl, []),
        ("corpus.jsonl.gz", _write_jsonl, []),
        ("corpus.jsonl.zst", _write_jsonl, []),
        ("corpus.parquet", _write_parquet, []),
    ],
)
def test_each_format_round_trips_to_tokenizer_ids(tmp_path, tokenizer_dir, documents, name, writer, extra):
    writer(tmp_path / name, documents)
    _prepare_ok([str(tmp_path / name)], tmp_path / "out", tokenizer_dir, *extra)
    assert _ids(tmp_path / "out") == expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN)


def test_blank_line_documents_are_read_as_documents(tmp_path, tokenizer_dir, documents):
    _write_text(tmp_path / "docs.txt", documents, blank_line=True)
    _prepare_ok([str(tmp_path / "docs.txt")], tmp_path / "out", tokenizer_dir, "--doc-separator", "blank-line")
    manifest = manifest_of(tmp_path / "out")
    assert manifest.stats["documents"] == len(documents)
    assert manifest.stats["segments"] == len(_lines(documents))
    assert _ids(tmp_path / "out") == expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN)


def test_folders_and_globs_are_read_in_sorted_order(tmp_path, tokenizer_dir, documents):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _write_text(data / "b.txt", documents[10:20])
    _write_text(data / "a.txt", documents[:10])
    _write_jsonl(data / "sub" / "c.jsonl", documents[20:30])
    _write_text(data / ".hidden.txt", documents[30:])  # hidden files are skipped
    _prepare_ok([str(data)], tmp_path / "out_dir", tokenizer_dir)
    assert _ids(tmp_path / "out_dir") == expected_sequences(tokenizer_dir, _lines(documents[:30]), MAX_LEN)
    assert [s["path"] for s in manifest_of(tmp_path / "out_dir").sources] == [
        f"{data}/a.txt", f"{data}/b.txt", f"{data}/sub/c.jsonl"
    ]

    _prepare_ok([str(data / "*.txt")], tmp_path / "out_glob", tokenizer_dir)
    assert _ids(tmp_path / "out_glob") == expected_sequences(tokenizer_dir, _lines(documents[:20]), MAX_LEN)


def test_several_inputs_after_one_flag_and_repeated_flags(tmp_path, tokenizer_dir, documents):
    _write_text(tmp_path / "a.txt", documents[:20])
    _write_jsonl(tmp_path / "b.jsonl", documents[20:])
    expected = expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN)
    _prepare_ok([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tmp_path / "out1", tokenizer_dir)
    assert _ids(tmp_path / "out1") == expected
    _prepare_ok([str(tmp_path / "a.txt")], tmp_path / "out2", tokenizer_dir, "--input", str(tmp_path / "b.jsonl"))
    assert _ids(tmp_path / "out2") == expected


def test_jsonl_text_field_is_configurable(tmp_path, tokenizer_dir, documents):
    _write_jsonl(tmp_path / "c.jsonl", documents, field="body")
    _prepare_ok([str(tmp_path / "c.jsonl")], tmp_path / "out", tokenizer_dir, "--text-field", "body")
    assert _ids(tmp_path / "out") == expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN)


def test_manifest_describes_the_shard_set(tmp_path, tokenizer_dir, documents):
    _write_text(tmp_path / "c.txt", documents)
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out", tokenizer_dir)
    out = tmp_path / "out"
    manifest = manifest_of(out)
    samples = read_split(out)
    assert manifest.total_samples == len(samples) == manifest.stats["train_sequences"]
    assert manifest.total_tokens == sum(len(ids) for _, ids in samples)
    keys = [key for key, _ in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert manifest.dtype == "uint16" and all(ids.dtype == np.uint16 for _, ids in samples)
    from transformers import AutoTokenizer

    source_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert manifest.max_len == MAX_LEN and manifest.vocab_size == len(source_tokenizer)
    special = manifest.special_tokens
    assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (0, 1, 2, 3, 4)
    assert manifest.sources == [{"path": str(out.parent / "c.txt"), "format": "text", "compression": None,
                                 "bytes": (out.parent / "c.txt").stat().st_size}]
    assert manifest.command[:2] == ["distil", "prepare"] and "--max-seq-len" in manifest.command
    counts = np.load(out / TOKEN_COUNTS_NAME)
    flat = np.concatenate([ids for _, ids in samples]).astype(np.int64)
    np.testing.assert_array_equal(counts, np.bincount(flat, minlength=manifest.vocab_size))
    # the saved tokenizer loads with transformers and is the one the manifest names
    from distil.data_pipeline.prepare.tokenize import tokenizer_sha256

    saved = AutoTokenizer.from_pretrained(str(out / TOKENIZER_DIR_NAME))
    assert tokenizer_sha256(saved) == manifest.tokenizer_sha256
    assert manifest.tokenizer_name == str(tokenizer_dir)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temp folder left


# ---------------------------------------------------------------- sequence rules


def test_chunking_follows_the_original():
    cls, sep = 2, 3
    assert chunk_sequence([cls, *range(10, 18), sep], cls, sep, 10) == [[cls, *range(10, 18), sep]]
    sequence = [cls, *range(10, 30), sep]  # 22 tokens, max_len 10 -> chunks of 8 with specials re-added
    chunks = chunk_sequence(sequence, cls, sep, 10)
    assert chunks == [
        [cls, *range(10, 17), sep],
        [cls, *range(17, 25), sep],
        [cls, *range(25, 30), sep],
    ]
    assert all(len(c) <= 10 for c in chunks)


def test_short_and_mostly_unknown_sequences_are_dropped():
    unk = 1
    assert drop_reason([2, *[9] * 9, 3], unk) == "short"  # 11 tokens
    assert drop_reason([2, *[9] * 10, 3], unk) is None  # 12 tokens
    assert drop_reason([2, *[unk] * 6, *[9] * 4, 3], unk) == "unk"  # 6 / 12 = 50 %
    assert drop_reason([2, *[unk] * 5, *[9] * 5, 3], unk) is None  # 5 / 12


def test_pack_fills_sequences_within_a_document():
    cls, sep = 2, 3
    segments = [[10] * 4, [11] * 3, [12] * 5, [13] * 20, [14] * 2]
    packed = list(document_sequences(segments, cls, sep, max_len=12, pack=True))
    assert packed[0] == [cls, *[10] * 4, *[11] * 3, sep]  # 4 + 3 fit in 10; + 5 would not
    assert packed[1] == [cls, *[12] * 5, sep]
    chunks = chunk_sequence([cls, *[13] * 20, sep], cls, sep, 12)  # too long alone: chunked as the original
    assert len(chunks) == 3 and packed[2:5] == chunks
    assert packed[5:] == [[cls, *[14] * 2, sep]]
    assert all(len(s) <= 12 for s in packed)
    unpacked = list(document_sequences(segments, cls, sep, max_len=12, pack=False))
    assert len(unpacked) == 4 + len(chunks)


def test_pack_fills_sequences_with_lines_of_one_document(tmp_path, tokenizer_dir):
    max_len = 128  # lines of 12..40 words never need chunking, no sequence is short: nothing is dropped
    documents = make_documents(30, seed=4, min_lines=2, max_lines=6, min_words=12, max_words=40)
    _write_text(tmp_path / "d.txt", documents, blank_line=True)
    common = ["--doc-separator", "blank-line", "--max-seq-len", str(max_len)]
    _prepare_ok([str(tmp_path / "d.txt")], tmp_path / "packed", tokenizer_dir, *common, "--pack")
    _prepare_ok([str(tmp_path / "d.txt")], tmp_path / "plain", tokenizer_dir, *common)
    packed, plain = _ids(tmp_path / "packed"), _ids(tmp_path / "plain")
    assert manifest_of(tmp_path / "packed").packed and len(packed) < len(plain)
    remaining = iter(packed)
    for document in documents:
        lines = [s[1:-1] for s in expected_sequences(tokenizer_dir, document, max_len)]
        assert len(lines) == len(document)
        bodies: list[list[int]] = []
        while sum(map(len, bodies)) < sum(map(len, lines)):
            sequence = next(remaining)
            assert len(sequence) <= max_len and sequence[0] == 2 and sequence[-1] == 3
            bodies.append(sequence[1:-1])
        assert [t for b in bodies for t in b] == [t for line in lines for t in line]  # in order, within the doc
        # greedy: the next sequence's first line would not have fitted into the previous one
        starts = [0]
        for body in bodies[:-1]:
            consumed, i = 0, starts[-1]
            while consumed < len(body):
                consumed += len(lines[i])
                i += 1
            assert consumed == len(body), "a sequence ends inside a line"
            assert len(body) + len(lines[i]) > max_len - 2
            starts.append(i)
    assert next(remaining, None) is None


def test_holdout_is_a_separate_disjoint_shard_set(tmp_path, tokenizer_dir, documents):
    _write_text(tmp_path / "c.txt", documents)
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out", tokenizer_dir, "--holdout-fraction", "0.3")
    out = tmp_path / "out"
    manifest = manifest_of(out)
    assert manifest.holdout_shards and all(s.path.startswith("holdout-") for s in manifest.holdout_shards)
    train, holdout = _ids(out), _ids(out, holdout=True)
    assert len(holdout) == manifest.stats["holdout_sequences"] > 0
    assert sorted(train + holdout) == sorted(expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN))
    counts = np.load(out / TOKEN_COUNTS_NAME)  # train split only
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate(train), minlength=manifest.vocab_size))
    # a different seed picks other documents
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out2", tokenizer_dir, "--holdout-fraction", "0.3",
                "--seed", "7")
    assert _ids(tmp_path / "out2", holdout=True) != holdout


def test_shard_size_is_respected(tmp_path, tokenizer_dir):
    documents = make_documents(200, seed=2)
    _write_text(tmp_path / "c.txt", documents)
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out", tokenizer_dir, "--shard-size-mb", "0.05")
    out = tmp_path / "out"
    manifest = manifest_of(out)
    assert len(manifest.shards) > 1
    for info in manifest.shards:
        size = (out / info.path).stat().st_size
        assert size <= 0.05 * (1 << 20) + 10240 + 1024  # target + tar end padding + one sample
    assert _ids(out) == expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN)


def test_trained_tokenizer_is_saved_beside_the_shards(tmp_path, documents):
    _write_text(tmp_path / "c.txt", documents)
    result = run_prepare(["--input", str(tmp_path / "c.txt"), "--output", str(tmp_path / "out"),
                          "--train-tokenizer", "150", "--max-seq-len", str(MAX_LEN), "--workers", "1",
                          "--no-shuffle"])
    assert result.exit_code == 0, result.output + result.stderr
    out = tmp_path / "out"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / TOKENIZER_DIR_NAME))
    manifest = manifest_of(out)
    assert manifest.tokenizer_name == "wordpiece-uncased-150-trained"
    assert len(tokenizer) == manifest.vocab_size <= 200
    assert tokenizer("The quick fox").input_ids[0] == manifest.special_tokens.cls
    assert _ids(out) == expected_sequences(out / TOKENIZER_DIR_NAME, _lines(documents), MAX_LEN)


def test_literal_special_token_text_is_encoded_as_text(tmp_path, tokenizer_dir):
    line = "the fox says [SEP] and [MASK] to the dog over the amber moon"
    (tmp_path / "c.txt").write_text(line + "\n")
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out", tokenizer_dir)
    (ids,) = _ids(tmp_path / "out")
    manifest = manifest_of(tmp_path / "out")
    assert ids.count(manifest.special_tokens.sep) == 1 and manifest.special_tokens.mask not in ids


def test_npy_bytes_match_numpy_and_dtype_follows_vocab(tmp_path):
    assert ids_dtype(30522) == np.uint16 and ids_dtype(65536) == np.uint16 and ids_dtype(65537) == np.int32
    for dtype in (np.uint16, np.int32):
        for length in (0, 1, 13, 512):
            ids = np.arange(length, dtype=dtype)
            np.save(tmp_path / "x.npy", ids, allow_pickle=False)
            assert npy_bytes(ids) == (tmp_path / "x.npy").read_bytes()


def test_same_input_and_flags_give_identical_bytes(tmp_path, documents):
    _write_jsonl(tmp_path / "c.jsonl", documents)
    args = ["--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "out"), "--train-tokenizer", "180",
            "--max-seq-len", str(MAX_LEN), "--workers", "1", "--holdout-fraction", "0.2", "--overwrite",
            "--shard-size-mb", "0.02"]
    assert run_prepare(args).exit_code == 0
    first = all_file_bytes(tmp_path / "out")
    assert run_prepare(args).exit_code == 0
    second = all_file_bytes(tmp_path / "out")
    assert sorted(first) == sorted(second) and len(first) > 5
    for name in first:
        assert first[name] == second[name], name


def test_shards_are_the_bytes_webdataset_shardwriter_writes(tmp_path):
    import webdataset as wds

    from distil.data_pipeline.prepare.shards import Members, ShardSetWriter

    rng = np.random.default_rng(0)
    samples = [(f"{i:010d}-0000000", npy_bytes(np.arange(n, dtype=np.uint16)), n) for i, n in
               enumerate(rng.integers(0, 600, 60))]
    target = 8000  # several shards; each is compared with a ShardWriter shard of the same samples
    writer = ShardSetWriter(tmp_path, "train", target)
    writer.write(Members.build(samples[:25]))
    writer.write(Members.build(samples[25:]))
    infos = writer.close()
    assert len(infos) > 2 and sum(i.samples for i in infos) == len(samples)
    assert sum(i.tokens for i in infos) == sum(t for _, _, t in samples)
    done = 0
    for info in infos:
        part = samples[done : done + info.samples]
        done += info.samples
        with wds.ShardWriter(str(tmp_path / "ref-%06d.tar"), encoder=False, mtime=0, verbose=0) as ref:
            for key, payload, _ in part:
                ref.write({"__key__": key, "ids.npy": payload})
        produced = (tmp_path / info.path).read_bytes()
        assert produced == (tmp_path / "ref-000000.tar").read_bytes(), info.path
        members = sum(512 + -(-len(p) // 512) * 512 for _, p, _ in part)
        assert members <= target or info.samples == 1


def test_the_streaming_loader_reads_every_prepared_token(tmp_path, tokenizer_dir, documents):
    stream_module = pytest.importorskip("distil.data_pipeline.stream.loader", reason="the Stage 2 loader is not in this tree")
    _write_text(tmp_path / "c.txt", documents)
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out", tokenizer_dir, "--holdout-fraction", "0.2")
    manifest = manifest_of(tmp_path / "out")
    for split, infos in (("train", manifest.shards), ("holdout", manifest.holdout_shards)):
        stream = stream_module.PretrainStream(str(tmp_path / "out"), split=split, batch_size=4)
        stream.set_epoch(0)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in stream)
        assert tokens == sum(s.tokens for s in infos), split


def test_output_inside_an_input_folder_is_not_read_back(tmp_path, tokenizer_dir, documents):
    data = tmp_path / "data"
    data.mkdir()
    _write_text(data / "a.txt", documents)
    for _ in range(2):  # the second run must not read the first run's shards as input
        _prepare_ok([str(data)], data / "shards", tokenizer_dir, "--overwrite")
    assert [s["path"] for s in manifest_of(data / "shards").sources] == [f"{data}/a.txt"]
    assert _ids(data / "shards") == expected_sequences(tokenizer_dir, _lines(documents), MAX_LEN)


def test_short_and_mostly_unknown_lines_are_dropped_end_to_end(tmp_path, tokenizer_dir):
    lines = [
        "the quick brown fox jumps over the lazy dog under an amber moon",  # kept
        "the quick brown fox",  # 4 + 2 tokens: dropped as short
        "\u4e2d\u6587\u5b57 \u00fe\u00f0 \u4e2d\u6587\u5b57 \u4e2d\u6587\u5b57 \u4e2d\u6587\u5b57 the fox",  # >= 50 % [UNK]
    ]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    _prepare_ok([str(tmp_path / "c.txt")], tmp_path / "out", tokenizer_dir)
    stats = manifest_of(tmp_path / "out").stats
    assert (stats["train_sequences"], stats["dropped_short"], stats["dropped_unk"]) == (1, 1, 1)
    assert _ids(tmp_path / "out") == expected_sequences(tokenizer_dir, lines, MAX_LEN)


def test_members_built_for_a_whole_batch_equal_those_built_one_by_one():
    from distil.data_pipeline.prepare.shards import Members

    rng = np.random.default_rng(7)
    for dtype, vocab in ((np.uint16, 30522), (np.int32, 70000)):
        for batch_number, first in ((0, 0), (3, 9_999_990), (12_345_678_901, 5)):  # keys wider than 10 / 7 digits
            lengths = rng.integers(0, 700, size=40)
            lengths[:3] = (0, 1, 512)
            seqs = [rng.integers(0, vocab, size=n).astype(dtype) for n in lengths]
            numbers = np.arange(first, first + 2 * len(seqs), 2)
            fast = Members.of_sequences(batch_number, numbers, np.concatenate(seqs), lengths)
            slow = Members.build([(f"{batch_number:010d}-{k:07d}", npy_bytes(ids), len(ids))
                                  for k, ids in zip(numbers, seqs, strict=True)])
            assert fast.sizes == slow.sizes and fast.tokens == slow.tokens
            assert fast.data == slow.data, (dtype, batch_number, first)
    assert Members.of_sequences(0, np.array([], dtype=np.int64), np.array([], np.uint16), np.array([])).data == b""
