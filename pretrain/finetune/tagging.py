"""Token tagging from CoNLL files (named entities, CoNLL-2003's layout): reading, tags aligned to sub-words,
entity-level scores.

- Files: one word per line, its tag in the last column (CoNLL-2003: `word POS chunk NER`; two columns `word
  TAG` work too), a blank line between sentences, `-DOCSTART-` lines skipped. A line without a tag, or a dev
  tag the train file never uses, stops the run with the file and line.
- Alignment: each word's tag goes to its first sub-word; continuation sub-words and special tokens get -100
  (left out of the loss and the scores), as transformers' token-classification recipe does. Words beyond
  `max_seq_len` are cut and counted in the report.
- Scores: seqeval's entity-level precision, recall and F1 (CoNLL's conlleval convention: an entity counts when
  its type and both ends are right) and the word accuracy, over the words each window holds; `score` is F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil.common.errors import UserError

TAGGING_TASKS = ("conll",)
ALIASES = {"conll2003": "conll", "conll-2003": "conll", "ner": "conll"}
IGNORE = -100


def tagging_task_name(name: str | None) -> str | None:
    if not name:
        return None
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in TAGGING_TASKS else None


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    lines: list[int]  # the file line of each word


def read_conll(path: str, *, kind: str) -> list[Sentence]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--{kind} {path}: no such file (give a CoNLL file: one 'word ... TAG' per line, a blank line "
                        "between sentences)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{p}: not a readable UTF-8 text file ({error})") from None
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def close() -> None:
        if words:
            sentences.append(Sentence(list(words), list(tags), list(lines)))
            words.clear()
            tags.clear()
            lines.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            close()
            continue
        if fields[0] == "-DOCSTART-":
            close()
            continue
        if len(fields) < 2:
            raise UserError(f"{p} line {number}: {line.strip()!r} has no tag: a CoNLL line is 'word ... TAG' (the tag "
                            "in the last column)")
        words.append(fields[0])
        tags.append(fields[-1])
        lines.append(number)
    close()
    if not sentences:
        raise UserError(f"{p} has no tagged words: give a CoNLL file (one 'word ... TAG' per line)")
    return sentences


def label_set(train: list[Sentence]) -> tuple[str, ...]:
    """The train file's tags, "O" first, then by entity type and B- before I-."""
    tags = {t for s in train for t in s.tags}
    return tuple(sorted(tags, key=lambda t: (t != "O", t[2:] if t[1:2] == "-" else t, t)))


def check_tags(sentences: list[Sentence], labels: tuple[str, ...], path: str) -> None:
    known = set(labels)
    for s in sentences:
        for tag, line in zip(s.tags, s.lines, strict=True):
            if tag not in known:
                raise UserError(f"{path} line {line}: tag {tag!r} is not one of the train file's tags "
                                f"({', '.join(labels)})")


def align(tokenizer, sentences: list[Sentence], labels: tuple[str, ...], max_seq_len: int,
          accepted: set[str]) -> tuple[dict[str, list], list[list[int]], int]:
    """Encodings with `labels` (-100 off the first sub-words), each sentence's first-sub-word position per word
    it keeps, and the number of words cut by max_seq_len."""
    ids = {t: i for i, t in enumerate(labels)}
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=max_seq_len)
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and k in accepted}
    out["labels"] = []
    firsts: list[list[int]] = []
    cut = 0
    for i, s in enumerate(sentences):
        row, first, previous = [], [], None
        for position, word in enumerate(enc.word_ids(i)):
            if word is None or word == previous:
                row.append(IGNORE)
            else:
                row.append(ids[s.tags[word]])
                first.append(position)
            previous = word
        out["labels"].append(row)
        firsts.append(first)
        cut += len(s.words) - len(first)
    return out, firsts, cut


def tag_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"f1": float(f1_score(gold, predicted, zero_division=0)),
            "precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(gold, predicted))}


def decode(logits: np.ndarray, label_ids: np.ndarray, labels: tuple[str, ...]) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tags of each sentence's scored words (positions whose label is not -100)."""
    gold, predicted = [], []
    for scores, row in zip(logits, label_ids, strict=True):
        keep = row != IGNORE
        gold.append([labels[i] for i in row[keep]])
        predicted.append([labels[i] for i in scores.argmax(-1)[keep]])
    return gold, predicted


def tag_distillation_loss(logits, teacher, teacher_mask, labels, alpha_kd: float, alpha_task: float,
                          temperature: float):
    """(total, soft, task) over the scored tokens (labels != -100): the soft term is KL(teacher || student at T)
    x T^2 averaged over the tokens the teacher has logits for (teacher_mask), the task term the tokens' CE; fp32."""
    import torch.nn.functional as F

    keep = labels != IGNORE
    both = keep & teacher_mask.bool()
    s = logits.float()
    task = F.cross_entropy(s[keep], labels[keep].long())
    soft = F.kl_div(F.log_softmax(s[both] / temperature, -1), F.log_softmax(teacher.float()[both] / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature**2 if both.any() else s.sum() * 0
    return alpha_kd * soft + alpha_task * task, soft, task
