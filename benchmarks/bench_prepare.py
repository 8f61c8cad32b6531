"""`distil prepare` end to end vs. the original's line-at-a-time encoding, on the same corpus and tokenizer.

The corpus is generated offline: words drawn from the unigram distribution of the sample corpus (Python
standard-library docstrings), a few non-ASCII words mixed in, lines of one to five sentences (the original
takes one line as one sequence). A WordPiece tokenizer (30522 entries asked) is trained on it first.

Baseline (binarized_data.py): one `tokenizer.encode("[CLS] line [SEP]")` per line with a fast BERT tokenizer
from transformers, then `np.uint16`. Ours: `distil prepare` with 2 workers: read, tokenise, chunk, filter,
write shards (globally shuffled, the default), token counts and manifest; `--no-shuffle-rows` adds the same
runs in corpus order. All run in this process, one after the other, in interleaved
rounds; the table gives medians, and the ratio to the original of each round.

`--corpus docs` takes real English text instead: this machine's documentation (benchmarks/real_text.py), with
bert-base-uncased's real vocabulary.

    python benchmarks/bench_prepare.py [--mb 20] [--corpus generated|docs] [--tokenizer trained|bert-uncased]
                                       [--workers 2] [--rounds 3] [--no-ablation] [--no-shuffle-rows]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import real_text  # noqa: E402 - benchmarks/real_text.py, beside this script

NON_ASCII_WORDS = ["café", "naïve", "Zürich", "–", "résumé", "“quoted”", "São", "Ångström", "façade", "coöperate"]


SYLLABLES = ("ka", "ren", "to", "mi", "sal", "vor", "ed", "li", "qua", "ster", "on", "bri", "dex", "um", "pha",
             "gol", "tri", "nes", "ul", "zo", "ca", "ment", "ir", "pe", "dro", "ix", "ath", "wen", "sy", "lor")


def _vocabulary(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Real words of the sample corpus by frequency, then made-up words (names, rare terms) for a long tail;
    returns the words and the cumulative Zipf distribution over them."""
    from distil.data_pipeline.prepare.sample_corpus import sample_paragraphs

    counts = Counter(w for p in sample_paragraphs() for w in re.findall(r"[A-Za-z][A-Za-z'-]*", p))
    real = sorted(counts, key=lambda w: (-counts[w], w))
    syllables = np.array(SYLLABLES)[rng.integers(0, len(SYLLABLES), size=(80_000, 4))]
    lengths = rng.integers(2, 5, size=80_000)
    made_up = {"".join(row[:n]) for row, n in zip(syllables.tolist(), lengths.tolist(), strict=True)}
    words = np.array(real + sorted(made_up - set(real)))
    probs = (np.arange(len(words)) + 10.0) ** -1.15
    return words, np.cumsum(probs / probs.sum())


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Writes about `megabytes` of English-like lines; returns the number of lines."""
    rng = np.random.default_rng(seed)
    words, cdf = _vocabulary(rng)
    target = int(megabytes * 1e6)
    written = lines = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            sentences = []
            lengths = rng.integers(6, 30, size=int(rng.integers(1, 6)))
            picks = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), len(words) - 1)
            chosen = list(words[picks])
            for i in np.nonzero(rng.random(len(chosen)) < 0.01)[0]:
                chosen[i] = NON_ASCII_WORDS[int(rng.integers(len(NON_ASCII_WORDS)))]
            for i in np.nonzero(rng.random(len(chosen)) < 0.06)[0]:
                chosen[i] += ","
            start = 0
            for n in lengths:
                sentence = " ".join(chosen[start : start + n]).rstrip(",")
                sentences.append(sentence[:1].upper() + sentence[1:] + str(rng.choice([".", ".", ".", "?", "!"])))
                start += n
            line = " ".join(sentences) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            lines += 1
    return lines


def train_tokenizer(corpus: Path, folder: Path, vocab_size: int) -> int:
    from distil.data_pipeline.prepare.tokenize import train_wordpiece

    def batches():
        with open(corpus, encoding="utf-8") as f:
            batch = []
            for line in f:
                batch.append(line.strip())
                if len(batch) == 10000:
                    yield batch
                    batch = []
            if batch:
                yield batch

    tokenizer = train_wordpiece(batches, vocab_size)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def baseline(corpus: Path, tokenizer_dir: Path) -> tuple[int, float, float]:
    """The original's binarized_data.py loop: encode one line at a time, keep uint16 arrays."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos, sep = tokenizer.cls_token, tokenizer.sep_token
    start, cpu = time.perf_counter(), _cpu_seconds()
    sequences = []
    with open(corpus, encoding="utf-8") as f:
        for text in f:
            ids = tokenizer.encode(f"{bos} {text.strip()} {sep}", add_special_tokens=False)
            sequences.append(np.uint16(ids))
    elapsed = time.perf_counter() - start
    return sum(len(s) for s in sequences), elapsed, _cpu_seconds() - cpu


def ours(
    corpus: Path, tokenizer_dir: Path, out: Path, workers: int, word_cache: bool = True, shuffle: bool = True
) -> tuple[int, float, float]:
    from distil.data_pipeline.prepare import stage
    from distil.data_pipeline.prepare import tokenize as tk

    original = tk._chunk_cache_spec
    if not word_cache:  # only meaningful in-process (workers=1): spawned workers re-import the module
        tk._chunk_cache_spec = lambda config: None
    try:
        config = stage.PrepareConfig(
            inputs=[str(corpus)], output=out, tokenizer=str(tokenizer_dir), workers=workers, progress=False,
            overwrite=True, shuffle=shuffle,
        )
        start, cpu = time.perf_counter(), _cpu_seconds()
        manifest = stage.prepare(config)
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    finally:
        tk._chunk_cache_spec = original
    return manifest.total_tokens + sum(s.tokens for s in manifest.holdout_shards), elapsed, cpu


def _members_of(shard_folder: Path, per_batch: int = 3000) -> list:
    """The tar members of a corpus-order shard set, regrouped as the worker batches that `prepare` hands on."""
    from distil.data_pipeline.prepare.shards import TAR_BLOCK, Members

    members = []
    for path in sorted(shard_folder.glob("train-*.tar")):
        raw, pos = path.read_bytes(), 0
        while pos + TAR_BLOCK <= len(raw) and raw[pos] != 0:
            size = int(raw[pos + 124 : pos + 135], 8)
            total = TAR_BLOCK + size + (-size % TAR_BLOCK)
            members.append(raw[pos : pos + total])
            pos += total
    groups = [members[i : i + per_batch] for i in range(0, len(members), per_batch)]
    return [Members(b"".join(g), [len(m) for m in g], [0] * len(g)) for g in groups]


def shuffle_cost(shard_folder: Path, work: Path) -> None:
    """CPU time of the external shuffle alone (both passes) over the members of a prepared corpus."""
    from distil.data_pipeline.prepare.shards import ShardSetWriter
    from distil.data_pipeline.prepare.shuffle import BUCKET_BYTES, ExternalShuffle

    batches = _members_of(shard_folder)
    total = sum(len(b.data) for b in batches)
    for bucket_bytes in (BUCKET_BYTES, 4 << 20):
        folder = work / f"shuffle-{bucket_bytes}"
        folder.mkdir()
        writer = ShardSetWriter(folder, "train", 256 << 20)
        start, cpu = time.perf_counter(), _cpu_seconds()
        shuffle = ExternalShuffle(folder / ".shuffle", "train", 0, 0, total, bucket_bytes)
        for batch in batches:
            shuffle.add(batch)
        first = _cpu_seconds()
        shuffle.drain(writer)
        writer.close()
        print(f"shuffle alone, {bucket_bytes >> 20} MB buckets: {sum(len(b.sizes) for b in batches)} samples, "
              f"{total / 1e6:.0f} MB: pass 1 {first - cpu:.2f} CPU s, pass 2 {_cpu_seconds() - first:.2f} CPU s, "
              f"{time.perf_counter() - start:.2f} s wall", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all approaches, interleaved")
    parser.add_argument("--no-ablation", action="store_true", help="skip the library-batch-encode-only row")
    parser.add_argument("--corpus", choices=["generated", "docs"], default="generated",
                        help="generated (default) or docs: this machine's real documentation text (real_text.py)")
    parser.add_argument("--tokenizer", choices=["trained", "bert-uncased"], default=None,
                        help="WordPiece trained on the corpus (generated's default) or bert-base-uncased's real "
                             "vocabulary (docs' default)")
    parser.add_argument("--no-shuffle-rows", action="store_true",
                        help="add rows of prepare --no-shuffle (corpus order), to see what the shuffle costs")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 2:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # "on 2 cores", children inherit it

    import tokenizers
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        corpus, tokenizer_dir, out = tmp_path / "corpus.txt", tmp_path / "tokenizer", tmp_path / "out"
        t0 = time.perf_counter()
        if args.corpus == "docs":
            stats = real_text.gather_documentation(corpus, args.mb)
            lines, what = stats["lines"], f"real documentation text from {stats['files']} files of {real_text.DOC_ROOTS}"
        else:
            lines, what = generate_corpus(corpus, args.mb), "generated"
        if (args.tokenizer or ("bert-uncased" if args.corpus == "docs" else "trained")) == "bert-uncased":
            vocab, how = real_text.bert_uncased_tokenizer(tokenizer_dir), "bert-base-uncased's WordPiece"
        else:
            vocab, how = train_tokenizer(corpus, tokenizer_dir, args.vocab), f"WordPiece trained (asked {args.vocab})"
        print(f"corpus: {what}, {corpus.stat().st_size / 1e6:.1f} MB, {lines} lines; {how}, vocab {vocab}; "
              f"setup {time.perf_counter() - t0:.0f} s", flush=True)
        approaches = {"original: encode one line at a time (1 process)": lambda: baseline(corpus, tokenizer_dir)}
        if not args.no_ablation:
            approaches["distil prepare --workers 1, library batch encode only"] = lambda: ours(
                corpus, tokenizer_dir, out, 1, word_cache=False)
        approaches["distil prepare --workers 1"] = lambda: ours(corpus, tokenizer_dir, out, 1)
        approaches[f"distil prepare --workers {args.workers}"] = lambda: ours(corpus, tokenizer_dir, out, args.workers)
        if args.no_shuffle_rows:  # what the global shuffle costs: the same runs in corpus order
            approaches["distil prepare --workers 1 --no-shuffle"] = lambda: ours(
                corpus, tokenizer_dir, out, 1, shuffle=False)
            approaches[f"distil prepare --workers {args.workers} --no-shuffle"] = lambda: ours(
                corpus, tokenizer_dir, out, args.workers, shuffle=False)
        # Rounds interleave the approaches, so that a change in the load of a shared machine hits all of them;
        # each round's ratios are taken within the round.
        results: dict[str, list[tuple[int, float, float, float]]] = {name: [] for name in approaches}
        for round_ in range(args.rounds):
            base_rate = None
            for name, run in approaches.items():
                load = os.getloadavg()[0]
                tokens, seconds, cpu = run()
                base_rate = base_rate or tokens / seconds
                results[name].append((tokens, seconds, cpu, tokens / seconds / base_rate))
                print(f"round {round_ + 1}: {name}: {seconds:.2f} s wall, {cpu:.1f} s CPU, load {load:.1f}", flush=True)
        if args.no_shuffle_rows:
            ours(corpus, tokenizer_dir, out, 1, shuffle=False)
            shuffle_cost(out, tmp_path)

    print(f"\nCPUs used: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}; "
          f"python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
          f"transformers {transformers.__version__}; medians over {args.rounds} round(s)")
    print(f"| {'approach':<56} | {'tokens':>9} | {'wall s':>7} | {'CPU s':>6} | {'M tokens/s':>10} "
          f"| {'vs original':>11} | {'per round':>20} |")
    print(f"|{'-' * 58}|{'-' * 10}:|{'-' * 8}:|{'-' * 7}:|{'-' * 11}:|{'-' * 12}:|{'-' * 22}|")
    for name, runs in results.items():
        tokens = runs[0][0]
        seconds, cpu, ratio = (float(np.median([r[i] for r in runs])) for i in (1, 2, 3))
        per_round = " ".join(f"{r[3]:.2f}x" for r in runs)
        print(f"| {name:<56} | {tokens:>9} | {seconds:>7.2f} | {cpu:>6.1f} | {tokens / seconds / 1e6:>10.3f} "
              f"| {ratio:>10.2f}x | {per_round:>20} |")


if __name__ == "__main__":
    main()
