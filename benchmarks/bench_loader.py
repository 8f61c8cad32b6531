"""Loader throughput per process: read + decode + batch + mask, in real (non-pad) tokens per second.

Two shard sets: `--corpus generated` (default: vocab 30522, lengths 12..512 with a quarter of the samples
at the full 512, as chunked long documents give; Zipf-distributed ids) or `--corpus docs` (real English:
this machine's documentation text, benchmarks/real_text.py, through `distil prepare` with bert-base-uncased's
vocabulary at max length 64: about 21 tokens a sequence, the case where the cost per sample dominates).
Times, in one process with one torch thread (what a DataLoader worker gets):
  read      the tar scan only (raw member bytes)
  decode    + the .npy decode and range checks of a chunk
  stream    the whole PretrainStream: read, decode, group, pad, and mask (or not)
Target: >= 1 M tokens/s per process at any length, so one core keeps a GPU fed.

    python benchmarks/bench_loader.py [--corpus generated|docs] [--samples 16000] [--mb 12] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
import real_text  # noqa: E402 - benchmarks/real_text.py, beside this script
from shardset import make_shard_set  # noqa: E402 - the test suite's shard set builder

from distil.data_pipeline.manifest import SAMPLE_KEY  # noqa: E402
from distil.data_pipeline.masking import MaskingConfig  # noqa: E402
from distil.data_pipeline.stream.loader import PretrainStream  # noqa: E402
from distil.data_pipeline.stream.plan import ChunkStats  # noqa: E402
from distil.data_pipeline.stream.read import RawSample, decode_samples  # noqa: E402
from distil.data_pipeline.stream.tarscan import TarSamples  # noqa: E402

VOCAB = 30522
MAX_LEN = 512


def time_it(fn, repeat: int) -> tuple[float, tuple[int, int]]:
    best, counts = float("inf"), (0, 0)
    for _ in range(repeat):
        start = time.perf_counter()
        counts = fn()
        best = min(best, time.perf_counter() - start)
    return best, counts


def _raw_chunks(shard_dir: Path, size: int = 1000):
    for tar in sorted(shard_dir.glob("train-*.tar")):
        with open(tar, "rb") as f:
            samples = TarSamples(f, SAMPLE_KEY)
            while not samples.done:
                yield [RawSample(str(tar), key, data) for key, data in samples.read(size)]


def read_only(shard_dir: Path) -> tuple[int, int]:
    n = samples = 0
    for chunk in _raw_chunks(shard_dir):
        n += sum((len(s.data) - 10 - int.from_bytes(s.data[8:10], "little")) // 2 for s in chunk)  # uint16 ids
        samples += len(chunk)
    return n, samples


def read_decode(shard_dir: Path, vocab: int, max_len: int) -> tuple[int, int]:
    n = samples = 0
    for chunk in _raw_chunks(shard_dir):
        flat, lengths = decode_samples(chunk, vocab, max_len, ChunkStats())
        n += len(flat)
        samples += len(lengths)
    return n, samples


def docs_shard_set(root: Path, megabytes: float) -> tuple[Path, int, int]:
    """Real documentation text -> shards at max length 64 with bert-base-uncased's vocabulary."""
    from distil.data_pipeline.prepare.stage import PrepareConfig, prepare

    corpus, tokenizer = root / "docs.txt", root / "bert-base-uncased"
    stats = real_text.gather_documentation(corpus, megabytes)
    real_text.bert_uncased_tokenizer(tokenizer)
    manifest = prepare(PrepareConfig(inputs=[str(corpus)], output=root / "shards", tokenizer=str(tokenizer),
                                     max_seq_len=64, workers=2, progress=False))
    print(f"corpus: {stats['bytes'] / 1e6:.1f} MB of documentation text from {stats['files']} files; "
          f"{manifest.total_samples} sequences, {manifest.total_tokens / manifest.total_samples:.1f} tokens each "
          "on average (max length 64, bert-base-uncased vocabulary)")
    return root / "shards", manifest.vocab_size, 64


def full_stream(shard_dir: Path, **kw) -> tuple[int, int]:
    stream = PretrainStream(str(shard_dir), **kw)
    tokens = samples = 0
    for batch in stream:
        tokens += int(batch["attention_mask"].sum())
        samples += batch["attention_mask"].shape[0]
    return tokens, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["generated", "docs"], default="generated")
    parser.add_argument("--samples", type=int, default=16000, help="generated: samples")
    parser.add_argument("--shards", type=int, default=4, help="generated: shards")
    parser.add_argument("--mb", type=float, default=12.0, help="docs: MB of documentation text")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        if args.corpus == "docs":
            shard_dir, vocab, max_len = docs_shard_set(Path(tmp), args.mb)
            batch_sizes = (8, 32)
        else:
            per_shard = args.samples // args.shards
            shard_dir = make_shard_set(Path(tmp), [per_shard] * args.shards, vocab_size=VOCAB, max_len=MAX_LEN,
                                       zipf=1.2, full_fraction=0.25)
            vocab, max_len, batch_sizes = VOCAB, MAX_LEN, (32,)
        stream_kw = dict(shuffle_buffer=1000, seed=0)
        rows = [
            ("read (tar scan)", lambda: read_only(shard_dir)),
            ("read + decode", lambda: read_decode(shard_dir, vocab, max_len)),
        ]
        for size in batch_sizes:
            rows += [
                (f"stream, batch {size}, group_by_size, no mask",
                 lambda size=size: full_stream(shard_dir, batch_size=size, masking=None, **stream_kw)),
                (f"stream, batch {size}, group_by_size, mask",
                 lambda size=size: full_stream(shard_dir, batch_size=size, masking=MaskingConfig(), **stream_kw)),
            ]
        budget = 16384 if max_len > 64 else 2048
        rows += [
            ("stream, batch 5 (recipe), mask",
             lambda: full_stream(shard_dir, batch_size=5, masking=MaskingConfig(), **stream_kw)),
            (f"stream, max_tokens {budget}, mask",
             lambda: full_stream(shard_dir, max_tokens=budget, masking=MaskingConfig(), **stream_kw)),
        ]
        print(
            f"python {platform.python_version()}, torch {torch.__version__}, webdataset {wds.__version__}, "
            f"numpy {np.__version__}; 1 process, 1 torch thread; {args.corpus} shards"
        )
        print(f"| {'stage':45s} | {'tokens':>10s} | {'seconds':>8s} | {'M tokens/s':>10s} | {'K samples/s':>11s} |")
        print(f"|{'-' * 47}|{'-' * 11}:|{'-' * 9}:|{'-' * 11}:|{'-' * 12}:|")
        for name, fn in rows:
            seconds, (tokens, samples) = time_it(fn, args.repeat)
            print(f"| {name:45s} | {tokens:10d} | {seconds:8.2f} | {tokens / seconds / 1e6:10.2f} "
                  f"| {samples / seconds / 1e3:11.1f} |", flush=True)


if __name__ == "__main__":
    main()
