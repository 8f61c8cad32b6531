"""A small English corpus built offline from the docstrings of Python's standard library.

Used by the quickstart (with `distil prepare --train-tokenizer`) and by benchmarks, where no hub and no
network are available. Source files are parsed with `ast`, never imported, so nothing runs; files are
visited in sorted order, so the output is the same for a given Python version.
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MAX_BYTES = 3_000_000
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
_WORD = re.compile(r"[A-Za-z]+")


def _stdlib_sources(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _is_prose(paragraph: str) -> bool:
    """Keeps paragraphs that read as English sentences, not code samples or tables."""
    if ">>>" in paragraph or paragraph.count("::") or paragraph.lstrip().startswith(("-", "*", "|", "+")):
        return False
    words = _WORD.findall(paragraph)
    if len(words) < 8 or len(paragraph.split()) < 8:
        return False
    letters = sum(len(w) for w in words)
    return letters / max(len(paragraph), 1) > 0.6


def sample_paragraphs() -> Iterator[str]:
    """Prose paragraphs of the standard library's docstrings, each on one line, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in _stdlib_sources(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(source):
            for block in re.split(r"\n\s*\n", doc):
                paragraph = " ".join(block.split())
                if paragraph not in seen and _is_prose(paragraph):
                    seen.add(paragraph)
                    yield paragraph


def write_sample_corpus(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Writes one paragraph per line (the `distil prepare` default format) up to `max_bytes`.

    Returns the number of paragraphs written.
    """
    written = 0
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for paragraph in sample_paragraphs():
            line = paragraph + "\n"
            size = len(line.encode("utf-8"))
            if written + size > max_bytes:
                break
            f.write(line)
            written += size
            count += 1
    return count
