"""Tiny encoders and small labelled files in every GLUE task's layout, generated here (nothing downloaded).

The examples follow a rule a small model can pick up (a sentiment word decides the label; for pairs, whether
both sentences carry the same sentiment), so that a few epochs of fine-tuning move the dev metrics.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

POSITIVE = ("good", "great", "fine", "nice", "superb", "lovely")
NEGATIVE = ("bad", "awful", "poor", "sad", "dull", "boring")
SUBJECTS = ("movie", "film", "plot", "actor", "story", "ending", "score", "cast")
FILLERS = ("very", "quite", "rather", "truly", "really", "so")
NLI = ("entailment", "neutral", "contradiction")


def sentence(rng: random.Random, positive: bool) -> str:
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    return f"the {rng.choice(SUBJECTS)} was {rng.choice(FILLERS)} {word}"


def vocabulary_text() -> list[str]:
    rng = random.Random(0)
    return [sentence(rng, rng.random() < 0.5) + " and the film" for _ in range(400)] + [
        " ".join((*POSITIVE, *NEGATIVE, *SUBJECTS, *FILLERS, "the", "was", "and", "?", ".", ","))] * 3


def make_models(root: Path, seq_len: int = 64) -> dict[str, str]:
    """A 2-layer BERT masked LM (the teacher) and a 1-layer DistilBERT masked LM (the student), random weights,
    each saved with a WordPiece tokenizer trained on the generated sentences."""
    from distil.data_pipeline.prepare.tokenize import train_wordpiece

    texts = vocabulary_text()
    tokenizer = train_wordpiece(lambda: [texts], 120)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=seq_len,
                                         pad_token_id=tokenizer.pad_token_id))
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                                     max_position_embeddings=seq_len,
                                                     pad_token_id=tokenizer.pad_token_id))
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        folder = root / name / "export"
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        out[name] = str(folder)
    return out


def rows_for(task: str, n: int, seed: int) -> list[tuple[str, str | None, str]]:
    """(text, text_pair or None, label string as the task's files write it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.random() < 0.5
        b = rng.random() < 0.5
        if task in ("cola", "sst2", "single"):
            out.append((sentence(rng, a), None, str(int(a))))
        elif task == "stsb":
            out.append((sentence(rng, a), sentence(rng, b), f"{(4.0 if a == b else 1.0) + rng.random():.3f}"))
        elif task == "mnli":
            label = NLI[0] if a == b else rng.choice(NLI[1:])
            out.append((sentence(rng, a), sentence(rng, b), label))
        elif task in ("qnli", "rte"):
            out.append((sentence(rng, a), sentence(rng, b), "entailment" if a == b else "not_entailment"))
        else:  # mrpc, qqp, wnli: 1 when both sentences agree
            out.append((sentence(rng, a), sentence(rng, b), str(int(a == b))))
    return out


def write_glue(task: str, path: Path, rows: list[tuple[str, str | None, str]], *, test: bool = False) -> Path:
    """The task's TSV layout as GLUE distributes it (test: its test layout, without labels)."""
    lines: list[str] = []
    for i, (a, b, y) in enumerate(rows):
        if task == "cola":
            lines.append(f"{i}\t{a}" if test else f"gj04\t{y}\t\t{a}")
        elif task == "sst2":
            lines.append(f"{i}\t{a}" if test else f"{a}\t{y}")
        elif task == "mrpc":
            lines.append(f"{i}\t{100 + i}\t{200 + i}\t{a}\t{b}" if test else f"{y}\t{100 + i}\t{200 + i}\t{a}\t{b}")
        elif task == "qqp":
            lines.append(f"{i}\t{a}\t{b}" if test else f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{y}")
        elif task == "stsb":
            lines.append(f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}" + ("" if test else f"\t{y}"))
        elif task == "mnli":
            parses = f"( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})"
            lines.append(f"{i}\t{31193 + i}\t{31193 + i}n\tfiction\t{parses}\t{a}\t{b}" + ("" if test else f"\t{y}\t{y}"))
        elif task == "qnli":
            lines.append(f"{i}\t{a}?\t{b}" + ("" if test else f"\t{y}"))
        else:  # rte, wnli
            lines.append(f"{i}\t{a}\t{b}" + ("" if test else f"\t{y}"))
    headers = {
        "cola": "index\tsentence" if test else None,
        "sst2": "index\tsentence" if test else "sentence\tlabel",
        "mrpc": ("index" if test else "Quality") + "\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "qqp": "id\tquestion1\tquestion2" if test else "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2" + ("" if test else "\tscore"),
        "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                "sentence2_parse\tsentence1\tsentence2" + ("" if test else "\tlabel1\tgold_label"),
        "qnli": "index\tquestion\tsentence" + ("" if test else "\tlabel"),
        "rte": "index\tsentence1\tsentence2" + ("" if test else "\tlabel"),
        "wnli": "index\tsentence1\tsentence2" + ("" if test else "\tlabel"),
    }
    header = headers[task]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + lines), encoding="utf-8")
    return path


def write_custom(path: Path, rows: list[tuple[str, str | None, str]], *, numeric: bool = False) -> Path:
    """CSV, TSV or JSONL by the path's suffix, with text, text_pair (when the rows have one) and label."""
    import csv

    has_pair = rows[0][1] is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for a, b, y in rows:
                record = {"text": a, **({"text_pair": b} if has_pair else {}), "label": float(y) if numeric else y}
                handle.write(json.dumps(record) + "\n")
        return path
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(["text", *(["text_pair"] if has_pair else []), "label"])
        for a, b, y in rows:
            writer.writerow([a, *([b] if has_pair else []), y])
    return path


# -- SQuAD and CoNLL files in their official layouts -------------------------------------------------------


def squad_json(path: Path, items: list[tuple[str, str, list[tuple[str, int]]]]) -> Path:
    """items: (context, question, [(answer text, answer_start)]); an empty list: unanswerable (v2.0)."""
    paragraphs = []
    for i, (context, question, answers) in enumerate(items):
        qa = {"id": f"q{i}", "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}
        if not answers:
            qa["is_impossible"] = True
        paragraphs.append({"context": context, "qas": [qa]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "test", "data": [{"title": "t", "paragraphs": paragraphs}]}, indent=1))
    return path


def qa_items(n: int, seed: int, sentences: int = 4, unanswerable: float = 0.0):
    """Contexts of sentences "the <subject> was <filler> <word> ." where one word is of the asked kind and the
    others of the other kind; the question "the good ?" asks for the positive word, "the bad ?" for the
    negative one. Unanswerable (v2.0): no word of the asked kind is there."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        positive = rng.random() < 0.5
        missing = rng.random() < unanswerable
        asked, other = (POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)
        kinds = [other] * sentences
        if not missing:
            kinds[rng.randrange(sentences)] = asked
        parts, answer, at = [], [], 0
        for subject, kind in zip(rng.sample(SUBJECTS, sentences), kinds, strict=True):
            word = rng.choice(kind)
            sentence = f"the {subject} was {rng.choice(FILLERS)} {word} ."
            if kind is asked:
                answer = [(word, at + sentence.index(f" {word} .") + 1)]
            parts.append(sentence)
            at += len(sentence) + 1
        items.append((" ".join(parts), "the good ?" if positive else "the bad ?", answer))
    return items


def conll_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """ "the <subject> was <filler> <word>" where <filler> <word> is a POS or NEG entity (B- then I-), and the
    subject a one-word THING entity."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        kind = "POS" if positive else "NEG"
        out.append([("the", "O"), (rng.choice(SUBJECTS), "B-THING"), ("was", "O"), (rng.choice(FILLERS), f"B-{kind}"),
                    (rng.choice(POSITIVE if positive else NEGATIVE), f"I-{kind}"), (".", "O")])
    return out


def write_conll(path: Path, sentences: list[list[tuple[str, str]]], columns: int = 4) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sentence in sentences:
        for word, tag in sentence:
            lines.append(" ".join([word, *(["NN", "I-NP"] if columns == 4 else []), tag]))
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_error_line(result, *needles: str) -> str:
    """A refused `distil` command: exit status 2 and exactly one `error:` line on stderr holding every needle."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
