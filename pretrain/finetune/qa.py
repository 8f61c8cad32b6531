"""Extractive question answering (SQuAD v1.1 and v2.0): the JSON files, the windows over long contexts, the
answer spans back from start/end logits, and the official scores.

- Files: SQuAD's JSON as distributed (`data[].paragraphs[].{context, qas[].{id, question, answers[].{text,
  answer_start}, is_impossible}}`). Every answer must sit at its `answer_start` in the context; a file where
  one does not is refused with the file, the line of the question's id and the answer.
- Windows: each question is paired with overlapping windows of its context (`max_seq_len` tokens in all,
  consecutive windows sharing `doc_stride` tokens), questions cut to `max_query_len` tokens. A training window
  that does not hold the whole answer, and every window of an unanswerable question, is labelled with the
  first token (the "no answer" position, as BERT's SQuAD 2.0 recipe).
- Answers: over every window of a question, the `n_best` highest start and end logits give candidate spans
  inside the context, no longer than `max_answer_len` tokens; the best by start + end logit is the answer,
  read from the context by character offsets. SQuAD 2.0: "" (no answer) when the best null score (start +
  end logit of the first token, lowest over the windows) beats the best span by more than `null_threshold`.
- Scores: the official evaluation scripts' (v1.1 and v2.0), reimplemented: answers normalised (lower case,
  punctuation and the articles a / an / the removed, white space collapsed); exact match and token F1, each
  the maximum over the gold answers; v2.0 scores a question without gold answers against "" and reports the
  HasAns / NoAns split. Figures are fractions here (x 100 in the tables).
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distil.common.errors import UserError

QA_TASKS = ("squad", "squad_v2")
ALIASES = {"squad1": "squad", "squad_v1": "squad", "squad1.1": "squad", "squad2": "squad_v2", "squad_v2.0": "squad_v2",
           "squad2.0": "squad_v2"}


def qa_task_name(name: str | None) -> str | None:
    """"squad" / "squad_v2" for a QA task name (or an alias), else None."""
    if not name:
        return None
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in QA_TASKS else None


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[dict[str, Any]]  # [{"text", "answer_start"}]; empty: unanswerable (v2.0)


@dataclass
class QAFeatures:
    """Tokenised windows: the model's inputs per window, and what maps a window back to its question."""

    # input_ids, attention_mask, (token_type_ids): one int32 array per window (SQuAD's 88K windows as Python lists
    # of ints would take gigabytes); start/end positions: one int per window
    encodings: dict[str, list]
    example_index: list[int]
    offsets: list[np.ndarray]  # per window, (tokens, 2) int32: each token's character span in the context, -1 elsewhere
    teacher: dict[str, list] | None = None  # --distill-from: the teacher's start/end logits per window
    labelled: bool = field(default=False)

    def __len__(self) -> int:
        return len(self.example_index)


def _where(p: Path, raw: str, qid: str) -> str:
    """The file and the line of a question's id, for an error message (searched only then: files are large)."""
    at = raw.find(f'"id": {json.dumps(qid)}')
    at = at if at >= 0 else raw.find(json.dumps(qid))
    return f"{p} line {raw.count(chr(10), 0, at) + 1}" if at >= 0 else str(p)


def read_squad(path: str, *, kind: str, version: str) -> list[QAExample]:
    """The questions of a SQuAD JSON file, every answer checked against its context."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--{kind} {path}: no such file (give a SQuAD JSON file such as train-v1.1.json)")
    try:
        raw = p.read_text(encoding="utf-8")
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{p}: not a readable SQuAD JSON file ({error})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise UserError(f"{p}: no 'data' list at the top: a SQuAD file is {{\"version\": ..., \"data\": [articles]}}")
    examples: list[QAExample] = []
    seen: set[str] = set()
    for article in articles:
        for paragraph in article.get("paragraphs", []) if isinstance(article, dict) else []:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise UserError(f"{p}: a paragraph without a 'context' string")
            for qa in paragraph.get("qas", []):
                qid, question = str(qa.get("id", "")), qa.get("question")
                if not qid or not isinstance(question, str):
                    raise UserError(f"{_where(p, raw, qid) if qid else p}: a question needs an 'id' and a 'question' "
                                    "string")
                if qid in seen:
                    raise UserError(f"{_where(p, raw, qid)}: question id {qid!r} appears twice")
                seen.add(qid)
                answers = [] if qa.get("is_impossible") else list(qa.get("answers") or [])
                for answer in answers:
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise UserError(f"{_where(p, raw, qid)}: question {qid!r}: each answer needs 'text' and an "
                                        "integer 'answer_start'")
                    if context[start:start + len(text)] != text:
                        found = context[start:start + len(text)]
                        raise UserError(f"{_where(p, raw, qid)}: question {qid!r}: answer {text!r} is not at "
                                        f"answer_start {start} of its context (found {found!r}); fix answer_start")
                if not answers and version == "squad":
                    raise UserError(f"{_where(p, raw, qid)}: question {qid!r} has no answer: SQuAD v1.1 questions all "
                                    "have one; use --task squad_v2 for unanswerable questions")
                examples.append(QAExample(qid, question.strip(), context, answers))
    if not examples:
        raise UserError(f"{p} has no questions: give a SQuAD file with data[].paragraphs[].qas[]")
    return examples


def _cut_question(tokenizer, question: str, max_query_len: int) -> str:
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_query_len:
        return question
    return question[:enc["offset_mapping"][max_query_len - 1][1]]


def make_features(tokenizer, examples: list[QAExample], max_seq_len: int, doc_stride: int, max_query_len: int,
                  accepted: set[str], labelled: bool) -> QAFeatures:
    """Windows of every example; with labelled=True, start/end positions of the (first) answer per window."""
    if tokenizer.padding_side != "right":
        raise UserError("question answering needs a tokenizer that pads on the right")
    questions = [_cut_question(tokenizer, e.question, max_query_len) for e in examples]
    try:
        enc = tokenizer(questions, [e.context for e in examples], truncation="only_second", max_length=max_seq_len,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    except BaseException as error:  # the tokenizers library panics (a BaseException) on a stride too large
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
        raise UserError(f"max_seq_len {max_seq_len} with doc_stride {doc_stride} and questions of up to "
                        f"{max_query_len} tokens do not fit ({str(error)[:160]}): lower doc_stride or "
                        "max_query_len") from None
    mapping = enc["overflow_to_sample_mapping"]
    encodings: dict[str, list] = {k: [np.asarray(row, dtype=np.int32) for row in enc[k]]
                                  for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and k in accepted}
    offsets: list[np.ndarray] = []
    starts, ends = [], []
    for i, spans in enumerate(enc["offset_mapping"]):
        sequence = enc.sequence_ids(i)
        window = np.asarray(spans, dtype=np.int32).reshape(-1, 2)
        window[[s != 1 for s in sequence]] = -1  # the question, special tokens, padding: no place in the context
        offsets.append(window)
        if not labelled:
            continue
        example = examples[mapping[i]]
        start = end = 0
        if example.answers:
            first = example.answers[0]
            char_start, char_end = first["answer_start"], first["answer_start"] + len(first["text"])
            context = [j for j, s in enumerate(sequence) if s == 1]
            lo, hi = context[0], context[-1]
            if spans[lo][0] <= char_start and spans[hi][1] >= char_end:  # the whole answer is in this window
                start = next(j for j in range(lo, hi + 1) if spans[j][1] > char_start)
                end = next(j for j in range(hi, lo - 1, -1) if spans[j][0] < char_end)
        starts.append(start)
        ends.append(end)
    if labelled:
        encodings["start_positions"], encodings["end_positions"] = starts, ends
    return QAFeatures(encodings, list(mapping), offsets, labelled=labelled)


def predict_answers(examples: list[QAExample], features: QAFeatures, start_logits: np.ndarray, end_logits: np.ndarray,
                    n_best: int = 20, max_answer_len: int = 30, version: str = "squad",
                    null_threshold: float = 0.0) -> dict[str, str]:
    """{question id: answer text} from each window's logits (rows in the order of `features`, padded columns
    beyond a window's length ignored)."""
    windows: dict[int, list[int]] = collections.defaultdict(list)
    for row, example in enumerate(features.example_index):
        windows[example].append(row)
    answers: dict[str, str] = {}
    for e, example in enumerate(examples):
        best_score, best_text, null_score = -np.inf, "", np.inf
        for row in windows.get(e, []):
            offsets = features.offsets[row]
            starts, ends = start_logits[row][:len(offsets)], end_logits[row][:len(offsets)]
            null_score = min(null_score, float(starts[0] + ends[0]))
            for s in np.argsort(starts)[::-1][:n_best]:
                if offsets[s][0] < 0:
                    continue
                for t in np.argsort(ends)[::-1][:n_best]:
                    if offsets[t][0] < 0 or t < s or t - s + 1 > max_answer_len:
                        continue
                    score = float(starts[s] + ends[t])
                    if score > best_score:
                        best_score = score
                        best_text = example.context[offsets[s][0]:offsets[t][1]]
        if version == "squad_v2" and (best_score == -np.inf or null_score - best_score > null_threshold):
            best_text = ""
        answers[example.id] = best_text
    return answers


# -- the official scores -------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles removed, white space collapsed (the official scripts' order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, version: str = "squad_v2") -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "squad_v2" and (not predicted or not wanted):  # an empty answer: 1 against an empty gold, else 0
        return float(predicted == wanted)
    common = collections.Counter(predicted) & collections.Counter(wanted)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_scores(examples: list[QAExample], predictions: dict[str, str], version: str) -> dict[str, float]:
    """exact and f1 (fractions), the max over gold answers; v2.0 adds HasAns_* / NoAns_* and their counts."""
    totals = {"exact": 0.0, "f1": 0.0}
    split = {"HasAns": [0.0, 0.0, 0], "NoAns": [0.0, 0.0, 0]}
    for example in examples:
        if version == "squad_v2":  # gold answers that normalise to nothing do not count; none left: ""
            golds = [a["text"] for a in example.answers if normalize_answer(a["text"])] or [""]
        else:
            golds = [a["text"] for a in example.answers]
        prediction = predictions.get(example.id, "")
        em = max(exact_match(prediction, g) for g in golds)
        f1 = max(token_f1(prediction, g, version) for g in golds)
        totals["exact"] += em
        totals["f1"] += f1
        part = split["HasAns" if example.answers else "NoAns"]
        part[0] += em
        part[1] += f1
        part[2] += 1
    n = len(examples)
    out = {"exact": totals["exact"] / n, "f1": totals["f1"] / n}
    if version == "squad_v2":
        for name, (em, f1, count) in split.items():
            if count:
                out[f"{name}_exact"], out[f"{name}_f1"] = em / count, f1 / count
            out[f"{name}_total"] = float(count)
    return out


def qa_window_settings(info: dict, max_seq_len: int) -> tuple[int, int]:
    """(doc_stride, max_query_len) for a saved QA model: its fine-tuning's (distil_task.json), bounded so that a
    window of max_seq_len still holds some context."""
    query = min(int(info.get("max_query_len") or 64), max_seq_len // 3)
    stride = min(int(info.get("doc_stride") or 128), max(1, (max_seq_len - query - 4) // 2))
    return stride, query


class QuestionAnswerer:
    """Answers questions with a model folder saved by `distil finetune --task squad[_v2] save_models=true`, with
    the same windows and answer search as the fine-tuning's dev scores (transformers 5 no longer ships a
    question-answering pipeline):

        answer = QuestionAnswerer("ft/student-squad/seed_42/model")("Who wrote it?", context)

    Settings come from the saved model's distil_task.json: the windows and answer search its dev scores used."""

    def __init__(self, folder: str, doc_stride: int = 128, max_query_len: int = 64, max_answer_len: int = 30,
                 n_best: int = 20, null_threshold: float = 0.0) -> None:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from distil.pretrain.finetune.seed_run import TASK_FILE

        info_file = Path(folder) / TASK_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        self.version = info.get("task") if info.get("task") in QA_TASKS else "squad"
        self.max_seq_len = int(info.get("max_seq_len") or 384)
        self.doc_stride, self.max_query_len = qa_window_settings(
            {"doc_stride": info.get("doc_stride", doc_stride), "max_query_len": info.get("max_query_len", max_query_len)},
            self.max_seq_len)
        self.max_answer_len = int(info.get("max_answer_len", max_answer_len))
        self.n_best = int(info.get("n_best", n_best))
        self.null_threshold = float(info.get("null_threshold", null_threshold))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()

    def __call__(self, question: str, context: str) -> str:
        import torch

        from distil.pretrain.finetune.model import forward_names

        examples = [QAExample("q", question.strip(), context, [])]
        features = make_features(self.tokenizer, examples, self.max_seq_len, self.doc_stride, self.max_query_len,
                                 forward_names(self.model), labelled=False)
        batch = self.tokenizer.pad(dict(features.encodings), return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**batch)
        return predict_answers(examples, features, out.start_logits.numpy(), out.end_logits.numpy(), self.n_best,
                               self.max_answer_len, self.version, self.null_threshold)["q"]
