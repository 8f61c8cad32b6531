"""Reading a labelled split: GLUE TSV files by task, or CSV / TSV / JSONL files with `text`, optional
`text_pair` and `label` (the custom task). Every problem is one UserError naming the file, the line and what
to change; nothing is tokenised here.

GLUE's TSV files are read as the GLUE loaders read them: tab-separated, no quoting (quotes are part of the
text), header row by name except CoLA's train/dev files; rows too short for the task's columns are skipped
and counted (QQP's train file has a few), as transformers' GLUE processors skip them.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from distil.common.errors import UserError
from distil.pretrain.finetune.tasks import TaskSpec, custom_task

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long passages (QNLI) exceed the 128 KiB default
CUSTOM_FORMATS = (".csv", ".tsv", ".jsonl")


@dataclass
class Split:
    """The rows of one file: texts, optional second texts, raw label strings (None: unlabelled) and ids."""

    path: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[str] | None
    index: list[str]
    lines: list[int]  # the line of each row in the file (1-based), for error messages
    skipped: int = 0  # rows too short for the task's columns

    def __len__(self) -> int:
        return len(self.texts)


def _check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path}: no such file")
    return p


def _open_text(p: Path):
    try:
        return p.open(encoding="utf-8", newline="")
    except OSError as error:
        raise UserError(f"cannot read {p}: {error.strerror}") from None


def _column_index(header: list[str], name: str, path: Path, task: TaskSpec, kind: str) -> int:
    try:
        return header.index(name)
    except ValueError:
        shown = ", ".join(repr(h) for h in header[:12]) + (", ..." if len(header) > 12 else "")
        raise UserError(f"{path}: no column {name!r} in its header ({shown}): a {task.name} {kind} file in GLUE's "
                        "layout has it") from None


def read_glue(task: TaskSpec, path: str, *, kind: str) -> Split:
    """kind: "train" / "dev" (labelled, the task's train/dev layout) or "test" (GLUE's test layout: a header with
    an index column and the text columns; labels read when the header also names the task's label column)."""
    p = _check_file(path, f"--{kind}")
    with _open_text(p) as handle:
        try:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        except (csv.Error, UnicodeDecodeError) as error:
            raise UserError(f"{p}: not a readable UTF-8 TSV file ({error})") from None
    labelled = kind != "test"
    if kind != "test" and not task.header:
        data, first_line = rows, 1
        text_i, pair_i, label_i = task.text, task.pair, task.label
        index_i = None
    else:
        if not rows:
            raise UserError(f"{p} is empty: a {task.name} {kind} file has a header row and at least one example")
        header = [h.strip() for h in rows[0]]
        data, first_line = rows[1:], 2
        if kind == "test":
            text_name, pair_name = task.test_columns
        else:
            text_name, pair_name = task.text, task.pair
        assert isinstance(text_name, str)
        text_i = _column_index(header, text_name, p, task, kind)
        pair_i = _column_index(header, pair_name, p, task, kind) if isinstance(pair_name, str) else None
        if kind == "test":
            labelled = isinstance(task.label, str) and task.label in header
        label_i = _column_index(header, task.label, p, task, kind) if labelled else None  # type: ignore[arg-type]
        index_i = header.index(task.test_index) if task.test_index in header else None
    assert isinstance(text_i, int)
    needed = max(i for i in (text_i, pair_i, label_i, index_i) if isinstance(i, int))
    texts, pairs, labels, index, lines = [], [], [], [], []
    skipped = 0
    for offset, row in enumerate(data):
        if len(row) <= needed:
            if any(field.strip() for field in row):
                skipped += 1
            continue
        texts.append(row[text_i])
        if pair_i is not None:
            pairs.append(row[pair_i])
        if label_i is not None:
            labels.append(row[label_i].strip())  # type: ignore[index]
        index.append(row[index_i] if index_i is not None else str(len(index)))
        lines.append(first_line + offset)
    if not texts:
        layout = ("4 tab-separated columns without a header (source, label, original label, sentence)"
                  if not task.header and kind != "test" else "a header row and tab-separated columns")
        raise UserError(f"{p} has no {task.name} examples ({skipped} rows too short): a {task.name} {kind} file "
                        f"in GLUE's layout has {layout}")
    return Split(str(p), texts, pairs if pair_i is not None else None, labels if label_i is not None else None,
                 index, lines, skipped)


def _custom_rows(p: Path) -> list[tuple[int, dict]]:
    suffix = p.suffix.lower()
    if suffix not in CUSTOM_FORMATS:
        raise UserError(f"{p}: a custom task reads {', '.join(CUSTOM_FORMATS)} files (columns text, optional "
                        "text_pair, label); rename or convert it")
    with _open_text(p) as handle:
        try:
            if suffix == ".jsonl":
                out = []
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise UserError(f"{p} line {number}: not JSON ({error.msg})") from None
                    if not isinstance(record, dict):
                        raise UserError(f"{p} line {number}: each line must be a JSON object with text and label")
                    out.append((number, record))
                return out
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            return [(reader.line_num, row) for row in reader]
        except (csv.Error, UnicodeDecodeError) as error:
            raise UserError(f"{p}: not a readable UTF-8 {suffix[1:].upper()} file ({error})") from None


def _field(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def read_custom(path: str, *, kind: str) -> Split:
    """CSV / TSV (header row) or JSONL (one object per line): `text`, optional `text_pair`, `label` (not needed
    in a test file; read when present)."""
    p = _check_file(path, f"--{kind}")
    rows = _custom_rows(p)
    if not rows:
        raise UserError(f"{p} is empty: give at least one example (columns text, optional text_pair, label)")
    keys = set(rows[0][1])
    if "text" not in keys:
        raise UserError(f"{p}: no 'text' column (has {', '.join(sorted(map(str, keys))) or 'none'}): a custom "
                        "task file has text, optional text_pair and label")
    labelled = "label" in keys
    if kind != "test" and not labelled:
        raise UserError(f"{p}: no 'label' column: a custom {kind} file has text, optional text_pair and label")
    has_pair = "text_pair" in keys
    texts, pairs, labels, index, lines = [], [], [], [], []
    for number, row in rows:
        text = _field(row.get("text"))
        if text is None:
            raise UserError(f"{p} line {number}: no text")
        texts.append(text)
        if has_pair:
            pair = _field(row.get("text_pair"))
            pairs.append(pair if pair is not None else "")
        if labelled:
            label = _field(row.get("label"))
            if label is None or not label.strip():
                raise UserError(f"{p} line {number}: empty label")
            labels.append(label.strip())
        index.append(_field(row.get("index")) or str(len(index)))
        lines.append(number)
    return Split(str(p), texts, pairs if has_pair else None, labels if labelled else None, index, lines)


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def infer_custom_task(train: Split, problem: str) -> TaskSpec:
    """Classification or regression from the train labels (problem "auto"), or as given."""
    assert train.labels is not None
    numbers = [_as_float(x) for x in train.labels]
    numeric = all(v is not None for v in numbers)
    if problem == "auto":
        problem = "regression" if numeric and any(v != int(v) for v in numbers) else "classification"  # type: ignore[arg-type]
    if problem == "regression":
        if not numeric:
            bad = next(i for i, v in enumerate(numbers) if v is None)
            raise UserError(f"{train.path} line {train.lines[bad]}: label {train.labels[bad]!r} is not a number: "
                            "problem=regression needs numeric labels (or set problem=classification)")
        return custom_task(None, train.pairs is not None)
    values = set(train.labels)
    if len(values) < 2:
        raise UserError(f"{train.path}: every label is {train.labels[0]!r}: classification needs at least two "
                        "classes (or set problem=regression)")
    if numeric:
        labels = tuple(sorted(values, key=float))
    else:
        labels = tuple(sorted(values))
    return custom_task(labels, train.pairs is not None)


def encode_labels(task: TaskSpec, split: Split) -> list[int] | list[float]:
    """Label ids (classification) or floats (regression); an unknown label names its line."""
    assert split.labels is not None
    if task.is_regression:
        out_f = []
        for raw, line in zip(split.labels, split.lines, strict=True):
            value = _as_float(raw)
            if value is None:
                raise UserError(f"{split.path} line {line}: label {raw!r} is not a number ({task.name} is a "
                                "regression task)")
            out_f.append(value)
        return out_f
    assert task.labels is not None
    ids = {label: i for i, label in enumerate(task.labels)}
    out = []
    for raw, line in zip(split.labels, split.lines, strict=True):
        if raw not in ids:
            known = ", ".join(task.labels)
            where = "the train file's labels" if task.name == "custom" else f"{task.name}'s labels"
            raise UserError(f"{split.path} line {line}: label {raw!r} is not one of {where} ({known})")
        out.append(ids[raw])
    return out


def check_pairs(task: TaskSpec, split: Split) -> None:
    """A pair task needs the second text in every split; a single-text task must not silently drop one."""
    if task.pair is not None and split.pairs is None:
        raise UserError(f"{split.path}: no text_pair column, but the train file has one: give every split the same "
                        "columns")
    if task.pair is None and split.pairs is not None:
        raise UserError(f"{split.path} has a text_pair column, but the train file has none: give every split the "
                        "same columns")


IMDB_LABELS = {"neg": "neg", "pos": "pos", "0": "neg", "1": "pos", "negative": "neg", "positive": "pos"}


def read_imdb(path: str, *, kind: str) -> Split:
    """IMDb's aclImdb layout (a folder with pos/ and neg/, one review per .txt file; other subfolders such as
    unsup/ are not read), or a CSV / TSV / JSONL file with text and label (neg/pos, 0/1 or negative/positive)."""
    p = Path(path)
    if not p.is_dir():
        split = read_custom(path, kind=kind)
        if split.labels is not None:
            for i, (raw, line) in enumerate(zip(split.labels, split.lines, strict=True)):
                if raw.lower() not in IMDB_LABELS:
                    raise UserError(f"{split.path} line {line}: label {raw!r} is not an IMDb label (neg or pos, 0 or 1)")
                split.labels[i] = IMDB_LABELS[raw.lower()]
        return split
    folders = {label: p / label for label in ("neg", "pos") if (p / label).is_dir()}
    if not folders:
        raise UserError(f"--{kind} {path}: a folder in IMDb's layout holds pos/ and neg/ subfolders of .txt reviews "
                        "(e.g. aclImdb/train); none here")
    if kind != "test" and len(folders) < 2:
        raise UserError(f"--{kind} {path}: only {next(iter(folders))}/ is there: a labelled IMDb folder has both pos/ "
                        "and neg/")
    texts, labels, index, lines = [], [], [], []
    for label, folder in sorted(folders.items()):
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise UserError(f"{folder}: no .txt reviews")
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise UserError(f"{file}: not a readable UTF-8 text file ({error})") from None
            texts.append(" ".join(text.replace("<br />", " ").split()))  # the reviews' HTML line breaks
            labels.append(label)
            index.append(f"{label}/{file.stem}")
            lines.append(1)
    # the files of one folder share a name pattern: the path is the place to name in an error
    return Split(str(p), texts, None, labels, index, lines)


def read_split(task: TaskSpec | None, path: str, *, kind: str) -> Split:
    if task is None:
        return read_custom(path, kind=kind)
    if task.name == "imdb":
        return read_imdb(path, kind=kind)
    return read_glue(task, path, kind=kind)
