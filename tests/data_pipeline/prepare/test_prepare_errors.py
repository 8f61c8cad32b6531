"""`distil prepare` on bad input: one `error:` line, exit code 2, nothing half-written."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from prepare_helpers import make_documents, manifest_of, read_split, run_prepare

from distil.common.errors import UserError
from distil.data_pipeline.prepare import shards, stage


@pytest.fixture()
def good_corpus(tmp_path) -> Path:
    path = tmp_path / "good.txt"
    path.write_text("\n".join(line for doc in make_documents(20, seed=3) for line in doc) + "\n")
    return path


def _fails(args: list[str], tokenizer_dir: Path, expect: str, out: Path) -> None:
    result = run_prepare([*args, "--output", str(out), "--tokenizer", str(tokenizer_dir), "--workers", "1"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expect in lines[0], lines[0]
    _assert_nothing_written(out)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()) or (out / "manifest.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], (
        "temp folder left behind"
    )


def test_missing_path(tmp_path, tokenizer_dir):
    _fails(["--input", str(tmp_path / "nope.txt")], tokenizer_dir, "no such file", tmp_path / "out")


def test_glob_without_matches(tmp_path, tokenizer_dir):
    _fails(["--input", str(tmp_path / "*.jsonl")], tokenizer_dir, "matches no files", tmp_path / "out")


@pytest.mark.skipif(
    os.geteuid() == 0, reason="running as root: file permissions cannot make a file unreadable"
)
def test_unreadable_path(tmp_path, tokenizer_dir, good_corpus):
    good_corpus.chmod(0)
    _fails(["--input", str(good_corpus)], tokenizer_dir, "cannot read", tmp_path / "out")


def test_binary_file(tmp_path, tokenizer_dir):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 50)
    _fails(["--input", str(tmp_path / "model.bin")], tokenizer_dir, "looks binary", tmp_path / "out")


def test_binary_file_inside_a_folder(tmp_path, tokenizer_dir, good_corpus):
    (tmp_path / "zz.dat").write_bytes(b"some text\n" + b"\x00\x01\x02" * 10)
    _fails(["--input", str(tmp_path)], tokenizer_dir, "zz.dat", tmp_path / "out")


def test_corrupt_gzip(tmp_path, tokenizer_dir):
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"hello world\n" * 100)[:40])
    _fails(["--input", str(tmp_path / "c.txt.gz")], tokenizer_dir, "cannot read", tmp_path / "out")


def test_empty_corpus(tmp_path, tokenizer_dir):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    _fails(["--input", str(tmp_path / "empty.txt")], tokenizer_dir, "no text", tmp_path / "out")


def test_corpus_empty_after_filtering(tmp_path, tokenizer_dir):
    (tmp_path / "short.txt").write_text("the fox\na dog\n")  # every sequence <= 11 tokens
    _fails(["--input", str(tmp_path / "short.txt")], tokenizer_dir, "no sequences left", tmp_path / "out")


def test_jsonl_row_without_text_field(tmp_path, tokenizer_dir):
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}, {"body": "no text field here"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(["--input", str(tmp_path / "c.jsonl")], tokenizer_dir, "c.jsonl:2", tmp_path / "out")


def test_jsonl_invalid_json(tmp_path, tokenizer_dir):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    _fails(["--input", str(tmp_path / "c.jsonl")], tokenizer_dir, "not valid JSON", tmp_path / "out")


def test_parquet_without_text_column(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"]}), tmp_path / "c.parquet")
    _fails(["--input", str(tmp_path / "c.parquet")], tokenizer_dir, "--text-field", tmp_path / "out")


def test_output_with_shards_needs_overwrite(tmp_path, tokenizer_dir, good_corpus):
    out = tmp_path / "out"
    args = [
        "--input",
        str(good_corpus),
        "--output",
        str(out),
        "--tokenizer",
        str(tokenizer_dir),
        "--workers",
        "1",
    ]
    assert run_prepare(args).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    _fails(["--input", str(good_corpus)], tokenizer_dir, "--overwrite", out)
    assert (out / "manifest.json").read_bytes() == before
    assert run_prepare([*args, "--overwrite", "--max-seq-len", "64"]).exit_code == 0
    assert manifest_of(out).max_len == 64


def test_overwrite_never_deletes_a_folder_that_is_not_a_shard_set(tmp_path, tokenizer_dir, good_corpus):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("precious")
    result = run_prepare(
        ["--input", str(good_corpus), "--output", str(out), "--tokenizer", str(tokenizer_dir), "--overwrite"]
    )
    assert result.exit_code == 2 and "holds no shard set" in result.stderr
    assert (out / "notes.md").read_text() == "precious"


def test_both_or_neither_tokenizer_option(tmp_path, tokenizer_dir, good_corpus):
    result = run_prepare(["--input", str(good_corpus), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "exactly one of --tokenizer" in result.stderr
    result = run_prepare(
        [
            "--input",
            str(good_corpus),
            "--output",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tokenizer_dir),
            "--train-tokenizer",
            "300",
        ]
    )
    assert result.exit_code == 2 and "exactly one of --tokenizer" in result.stderr


def test_missing_tokenizer(tmp_path, good_corpus):
    result = run_prepare(
        [
            "--input",
            str(good_corpus),
            "--output",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tmp_path / "no-such-tokenizer"),
        ]
    )
    assert result.exit_code == 2 and "cannot load tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer_dir):
    good = "the quick brown fox jumps over the lazy dog and the seven wizards brew"
    data = (good + "\n").encode() + b"the quick \xff\xfe brown fox jumps over the lazy dog again \xc3\n"
    (tmp_path / "c.txt").write_bytes(data)
    out = tmp_path / "out"
    result = run_prepare(
        [
            "--input",
            str(tmp_path / "c.txt"),
            "--output",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
            "--workers",
            "1",
        ]
    )
    assert result.exit_code == 0, result.stderr
    assert manifest_of(out).stats["replaced_utf8"] == 3  # \xff, \xfe and the truncated \xc3
    assert "3 invalid UTF-8" in result.output
    assert len(read_split(out)) == 2


def test_interrupted_run_leaves_no_shard_set(tmp_path, tokenizer_dir, monkeypatch):
    lines = [line for doc in make_documents(200, seed=5) for line in doc]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    calls = {"n": 0}
    original = shards.ShardSetWriter.write

    def write_then_stop(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # a few batches in: some shard bytes already written
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(shards.ShardSetWriter, "write", write_then_stop)
    out = tmp_path / "out"
    config = stage.PrepareConfig(
        inputs=[str(tmp_path / "c.txt")],
        output=out,
        tokenizer=str(tokenizer_dir),
        max_seq_len=48,
        workers=1,
        progress=False,
        batch_bytes=2000,
        shard_size_mb=0.01,
        shuffle=False,  # every batch goes straight to the shard writer (the shuffled run: test_prepare_shuffle.py)
    )
    with pytest.raises(KeyboardInterrupt):
        stage.prepare(config)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]


def test_config_validation_messages():
    base = {"inputs": ["x"], "output": Path("o"), "tokenizer": "t"}
    for override, message in [
        ({"max_seq_len": 8}, "--max-seq-len"),
        ({"holdout_fraction": 1.0}, "--holdout-fraction"),
        ({"shard_size_mb": 0}, "--shard-size-mb"),
        ({"workers": 0}, "--workers"),
        ({"tokenizer": None, "train_tokenizer": 10}, "--train-tokenizer"),
    ]:
        with pytest.raises(UserError, match=message):
            stage.PrepareConfig(**{**base, **override}).validate()
