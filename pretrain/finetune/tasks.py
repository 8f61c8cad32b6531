"""The GLUE tasks as their files lay them out, and the custom task.

Each GLUE task is known by name with the layout of its TSV files as distributed by the GLUE benchmark
(gluebenchmark.com; the files transformers' GLUE processors read): which column holds the
text, the second text of a pair and the label, whether the file has a header row, and which label strings it
uses. Metrics are GLUE's: Matthews correlation for CoLA, F1 and accuracy for MRPC and QQP, Pearson and
Spearman correlation for STS-B, accuracy elsewhere. A task's score is the mean of its metrics (the GLUE
leaderboard's convention for tasks with two); MNLI's score is the accuracy on the matched dev set (the
paper's one MNLI column), the mismatched accuracy is reported beside it. The macro score of a model is the
mean of its task scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distil.common.errors import UserError

Column = str | int  # a header name, or a 0-based position in files without a header


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...] | None  # the label strings as the files write them, in id order; None: regression
    metrics: tuple[str, ...]  # GLUE's metrics for the task; the task score is their mean
    text: Column
    pair: Column | None
    label: Column
    header: bool = True  # train / dev files start with a header row
    test_text: str | None = None  # test files (no labels) always have a header; default: same as text
    test_pair: str | None = None
    test_index: str = "index"
    positive_label: str | None = None  # for F1: the label counted as positive
    extra_metrics: tuple[str, ...] = ()  # reported, not part of the score
    mismatched: bool = False  # MNLI: a second dev / test file (mismatched genres)
    label_names: dict[str, str] = field(default_factory=dict)  # readable names of numeric labels

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def test_columns(self) -> tuple[str, str | None]:
        text = self.test_text or (self.text if isinstance(self.text, str) else None)
        pair = self.test_pair or (self.pair if isinstance(self.pair, str) else None)
        assert text is not None, self.name
        return text, pair


BINARY = ("0", "1")

GLUE_TASKS: dict[str, TaskSpec] = {
    # CoLA train/dev: no header; source, label, original label, sentence. test: index, sentence.
    "cola": TaskSpec("cola", BINARY, ("mcc",), text=3, pair=None, label=1, header=False, test_text="sentence",
                     label_names={"0": "unacceptable", "1": "acceptable"}),
    "sst2": TaskSpec("sst2", BINARY, ("accuracy",), text="sentence", pair=None, label="label",
                     label_names={"0": "negative", "1": "positive"}),
    "mrpc": TaskSpec("mrpc", BINARY, ("f1", "accuracy"), text="#1 String", pair="#2 String", label="Quality",
                     positive_label="1", label_names={"0": "not_equivalent", "1": "equivalent"}),
    "qqp": TaskSpec("qqp", BINARY, ("f1", "accuracy"), text="question1", pair="question2", label="is_duplicate",
                    test_index="id", positive_label="1", label_names={"0": "not_duplicate", "1": "duplicate"}),
    "stsb": TaskSpec("stsb", None, ("pearson", "spearman"), text="sentence1", pair="sentence2", label="score"),
    "mnli": TaskSpec("mnli", ("entailment", "neutral", "contradiction"), ("accuracy",), text="sentence1",
                     pair="sentence2", label="gold_label", mismatched=True),
    "qnli": TaskSpec("qnli", ("entailment", "not_entailment"), ("accuracy",), text="question", pair="sentence",
                     label="label"),
    "rte": TaskSpec("rte", ("entailment", "not_entailment"), ("accuracy",), text="sentence1", pair="sentence2",
                    label="label"),
    "wnli": TaskSpec("wnli", BINARY, ("accuracy",), text="sentence1", pair="sentence2", label="label",
                     label_names={"0": "not_entailment", "1": "entailment"}),
}

# Long documents: IMDb's movie reviews (Maas et al. 2011; the paper's Table 2), its aclImdb folder layout (a folder
# with pos/ and neg/ holding one review per .txt file) or a CSV / TSV / JSONL file with text and label columns.
DOCUMENT_TASKS: dict[str, TaskSpec] = {
    "imdb": TaskSpec("imdb", ("neg", "pos"), ("accuracy",), text="text", pair=None, label="label",
                     label_names={"neg": "negative", "pos": "positive"}),
}
LONG_TASKS = frozenset(DOCUMENT_TASKS)  # truncation=auto keeps their head and tail (docs/finetune.md)

# the paper's Table 1 order
GLUE_ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}
PROBLEMS = ("auto", "classification", "regression")


def task_names() -> str:
    return ", ".join((*GLUE_ORDER, *DOCUMENT_TASKS, "squad", "squad_v2", "conll", "custom"))


def glue_task(name: str) -> TaskSpec:
    """A named task: one of GLUE's, or IMDb."""
    key = ALIASES.get(name.lower(), name.lower())
    known = {**GLUE_TASKS, **DOCUMENT_TASKS}
    if key not in known:
        raise UserError(f"--task {name!r} is not a task distil knows: give one of {task_names()}")
    return known[key]


def custom_task(labels: tuple[str, ...] | None, has_pair: bool) -> TaskSpec:
    """A labelled file of your own: columns text, optional text_pair, label; classification (labels given)
    or regression (labels None). Classification is scored by accuracy (macro F1 beside it), regression by the
    mean of Pearson and Spearman correlation, as STS-B."""
    if labels is None:
        return TaskSpec("custom", None, ("pearson", "spearman"), text="text", pair="text_pair" if has_pair else None,
                        label="label", test_index="index")
    return TaskSpec("custom", labels, ("accuracy",), text="text", pair="text_pair" if has_pair else None,
                    label="label", extra_metrics=("f1_macro",))
