"""Loader throughput per process: read + decode + batch + mask, in real (non-pad) tokens per second.

Generates a shard set (vocab 30522, lengths 12..512 with a quarter of the samples at the full 512, as
chunked long documents give; Zipf-distributed ids), then times, in one process with one torch thread
(what a DataLoader worker gets):
  read      webdataset tar iteration only (raw bytes)
  decode    + np.load(allow_pickle=False) and validation
  stream    the whole PretrainStream: read, decode, group, pad, and mask (or not)
Target: >= 1 M tokens/s per process, so one core keeps a GPU fed.

    python benchmarks/bench_loader.py [--samples 20000] [--repeat 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data_pipeline"))
from shardset import make_shard_set  # noqa: E402 - the test suite's shard set builder

from distil.data_pipeline.masking import MaskingConfig  # noqa: E402
from distil.data_pipeline.read import decode_sample  # noqa: E402
from distil.data_pipeline.stream import PretrainStream  # noqa: E402

VOCAB = 30522
MAX_LEN = 512


def time_it(fn, repeat: int) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = fn()
        best = min(best, time.perf_counter() - start)
    return best, tokens


def read_only(shard_dir: Path) -> int:
    n = 0
    for tar in sorted(shard_dir.glob("train-*.tar")):
        for sample in wds.WebDataset([str(tar)], shardshuffle=False, nodesplitter=None, workersplitter=None):
            data = sample["ids.npy"]
            n += (len(data) - 10 - int.from_bytes(data[8:10], "little")) // 2  # uint16 ids after the header
    return n


def read_decode(shard_dir: Path) -> int:
    n = 0
    for tar in sorted(shard_dir.glob("train-*.tar")):
        for sample in wds.WebDataset([str(tar)], shardshuffle=False, nodesplitter=None, workersplitter=None):
            n += len(decode_sample(sample, VOCAB, MAX_LEN))
    return n


def full_stream(shard_dir: Path, **kw) -> int:
    stream = PretrainStream(str(shard_dir), **kw)
    return sum(int(b["attention_mask"].sum()) for b in stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        per_shard = args.samples // args.shards
        shard_dir = make_shard_set(
            Path(tmp),
            [per_shard] * args.shards,
            vocab_size=VOCAB,
            max_len=MAX_LEN,
            zipf=1.2,
            full_fraction=0.25,
        )
        stream_kw = dict(shuffle_buffer=1000, seed=0)
        rows = [
            ("read (tar iteration)", lambda: read_only(shard_dir)),
            ("read + decode", lambda: read_decode(shard_dir)),
            (
                "stream, batch 32, group_by_size, no mask",
                lambda: full_stream(shard_dir, batch_size=32, masking=None, **stream_kw),
            ),
            (
                "stream, batch 32, group_by_size, mask",
                lambda: full_stream(shard_dir, batch_size=32, masking=MaskingConfig(), **stream_kw),
            ),
            (
                "stream, batch 5 (recipe), mask",
                lambda: full_stream(shard_dir, batch_size=5, masking=MaskingConfig(), **stream_kw),
            ),
            (
                "stream, max_tokens 16384, mask",
                lambda: full_stream(shard_dir, max_tokens=16384, masking=MaskingConfig(), **stream_kw),
            ),
        ]
        print(
            f"python {platform.python_version()}, torch {torch.__version__}, webdataset {wds.__version__}, "
            f"numpy {np.__version__}; 1 process, 1 torch thread"
        )
        print(f"{'stage':45s} {'tokens':>10s} {'seconds':>8s} {'M tokens/s':>11s}")
        for name, fn in rows:
            seconds, tokens = time_it(fn, args.repeat)
            print(f"{name:45s} {tokens:10d} {seconds:8.2f} {tokens / seconds / 1e6:11.2f}")


if __name__ == "__main__":
    main()
