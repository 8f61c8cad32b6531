"""`distil finetune`: every GLUE layout read, metrics against independent computations, the report and test
predictions, MLflow parent/child runs, inference timing, and one-line errors that write nothing."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from finetune_helpers import NLI, assert_one_error_line, make_models, rows_for, write_custom, write_glue

from distil.pretrain.cli import main
from distil.pretrain.finetune.data import encode_labels, infer_custom_task, read_custom, read_glue
from distil.pretrain.finetune.metrics import compute_metrics, median_metrics, median_seed
from distil.pretrain.finetune.tasks import GLUE_ORDER, GLUE_TASKS, glue_task

FAST = ["--epochs", "1", "--seeds", "1", "--batch-size", "16", "--max-seq-len", "32", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return make_models(tmp_path_factory.mktemp("models"))


def invoke(args: list[str]):
    return CliRunner().invoke(main, ["finetune", *args], catch_exceptions=False)


def task_files(root: Path, task: str, n_train: int = 48, n_dev: int = 24, test: bool = False) -> list[str]:
    args = ["--task", task, "--train", str(write_glue(task, root / task / "train.tsv", rows_for(task, n_train, 1))),
            "--dev", str(write_glue(task, root / task / "dev.tsv", rows_for(task, n_dev, 2)))]
    if test:
        args += ["--test", str(write_glue(task, root / task / "test.tsv", rows_for(task, 10, 3), test=True))]
    return args


# -- reading every GLUE layout (no training) ---------------------------------------------------------------


@pytest.mark.parametrize("task", GLUE_ORDER)
def test_every_glue_layout_reads_texts_pairs_and_labels(task, tmp_path):
    spec = glue_task(task)
    rows = rows_for(task, 12, 7)
    train = read_glue(spec, str(write_glue(task, tmp_path / "train.tsv", rows)), kind="train")
    assert train.texts == [a if task != "qnli" else f"{a}?" for a, _, _ in rows]
    assert train.pairs == (None if spec.pair is None else [b for _, b, _ in rows])
    assert train.labels == [y for _, _, y in rows]
    assert train.skipped == 0
    ids = encode_labels(spec, train)
    if spec.is_regression:
        assert ids == pytest.approx([float(y) for _, _, y in rows])
    else:
        assert [spec.labels[i] for i in ids] == [y for _, _, y in rows]
    test = read_glue(spec, str(write_glue(task, tmp_path / "test.tsv", rows, test=True)), kind="test")
    assert test.labels is None and test.texts == train.texts and test.index == [str(i) for i in range(12)]


def test_glue_aliases_and_the_mnli_label_order():
    assert glue_task("SST-2") is GLUE_TASKS["sst2"] and glue_task("sts-b") is GLUE_TASKS["stsb"]
    assert GLUE_TASKS["mnli"].labels == NLI  # the order of huggingface/datasets' glue builder


def test_short_rows_are_skipped_and_counted(tmp_path):
    path = write_glue("qqp", tmp_path / "train.tsv", rows_for("qqp", 6, 1))
    with path.open("a") as handle:
        handle.write("99\t1\t2\tonly a question\n")  # QQP's train file has rows like this
    split = read_glue(GLUE_TASKS["qqp"], str(path), kind="train")
    assert len(split) == 6 and split.skipped == 1


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_custom_files_classification_and_regression_are_detected(suffix, tmp_path):
    cls_rows = [(a, b, {"0": "neg", "1": "pos"}[y]) for a, b, y in rows_for("mrpc", 10, 1)]
    split = read_custom(str(write_custom(tmp_path / f"c{suffix}", cls_rows)), kind="train")
    task = infer_custom_task(split, "auto")
    assert task.labels == ("neg", "pos") and split.pairs == [b for _, b, _ in cls_rows]
    reg_rows = rows_for("stsb", 10, 1)
    split = read_custom(str(write_custom(tmp_path / f"r{suffix}", reg_rows, numeric=True)), kind="train")
    task = infer_custom_task(split, "auto")
    assert task.is_regression and encode_labels(task, split) == pytest.approx([float(y) for _, _, y in reg_rows])
    int_rows = [(a, None, y) for a, _, y in rows_for("sst2", 10, 1)]
    split = read_custom(str(write_custom(tmp_path / f"i{suffix}", int_rows)), kind="train")
    assert infer_custom_task(split, "auto").labels == ("0", "1")  # integer labels: classes
    assert infer_custom_task(split, "regression").is_regression  # ... unless told otherwise


# -- metrics: GLUE's definitions, checked against plain formulas ---------------------------------------------


def test_metrics_agree_with_plain_formulas():
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.7, refs, 1 - refs)
    tp = int(((preds == 1) & (refs == 1)).sum())
    fp = int(((preds == 1) & (refs == 0)).sum())
    fn = int(((preds == 0) & (refs == 1)).sum())
    tn = int(((preds == 0) & (refs == 0)).sum())
    mrpc = compute_metrics(GLUE_TASKS["mrpc"], preds, refs)
    assert mrpc["accuracy"] == pytest.approx((tp + tn) / 200)
    assert mrpc["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert mrpc["score"] == pytest.approx((mrpc["f1"] + mrpc["accuracy"]) / 2)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(GLUE_TASKS["cola"], preds, refs) == pytest.approx({"mcc": mcc, "score": mcc})
    x = rng.normal(size=50)
    y = x + rng.normal(scale=0.5, size=50)
    stsb = compute_metrics(GLUE_TASKS["stsb"], x, y)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 - no ties in continuous draws
    assert stsb["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert stsb["spearman"] == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])
    assert compute_metrics(GLUE_TASKS["stsb"], np.full(50, 2.0), y)["pearson"] == 0.0  # constant: no nan


def test_median_over_seeds_and_the_median_seed():
    per_seed = [{"dev_score": 0.5, "dev_f1": 0.9}, {"dev_score": 0.7, "dev_f1": 0.1}, {"dev_score": 0.6}]
    assert median_metrics(per_seed) == {"dev_score": 0.6, "dev_f1": 0.5}
    assert median_seed([42, 43, 44], [0.5, 0.7, 0.6]) == 44
    assert median_seed([42, 43], [0.7, 0.5]) == 43  # even count: the lower middle


# -- fine-tuning end to end --------------------------------------------------------------------------------


def test_sst2_fine_tuning_learns_reports_tracks_and_reviews(models, tmp_path):
    """Teacher on SST-2: dev accuracy rises above chance; the report's metrics equal a recomputation with the
    saved model; MLflow holds a parent run (medians) and a child run with per-epoch metrics; review shows it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    result = invoke(["--model", models["teacher"], *task_files(tmp_path, "sst2", 64, 32), "--output", str(out),
                     "--seeds", "1", "--epochs", "4", "--batch-size", "8", "--max-seq-len", "32", "--lr", "3e-3",
                     "--tracking-uri", uri, "--experiment", "ft", "save_models=true", "inference_max_examples=20"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "sst2" and report["metrics"] == ["accuracy"] and report["median_seed"] == 42
    (seed,) = report["seeds"]
    assert [h["epoch"] for h in seed["history"]] == [1, 2, 3, 4]
    assert all("train_loss" in h and "dev_accuracy" in h for h in seed["history"])
    assert seed["dev"]["dev_accuracy"] > 0.75, seed["history"]  # chance is ~0.5 on this rule
    assert report["median"]["dev_score"] == seed["dev"]["dev_score"] == seed["dev"]["dev_accuracy"]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    saved = out / "seed_42" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(str(saved)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(saved))
    rows = list(csv.reader((tmp_path / "sst2" / "dev.tsv").open(), delimiter="\t"))[1:]
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer([r[0]], return_tensors="pt")).logits for r in rows])
    accuracy = (logits.argmax(-1) == torch.tensor([int(r[1]) for r in rows])).float().mean().item()
    assert seed["dev"]["dev_accuracy"] == pytest.approx(accuracy)

    inference = report["inference"]
    assert inference["examples"] == 20 and inference["batch_size"] == 1 and inference["device"] == "cpu"
    assert inference["seconds"] > 0 and inference["torch_threads"] == 1
    assert report["num_parameters"] == sum(p.numel() for p in model.parameters())

    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    parent = next(r for r in runs if r.data.params.get("mode") == "finetune")
    child = next(r for r in runs if r.data.params.get("mode") == "finetune-seed")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id == report["mlflow"]["parent_run_id"]
    assert parent.data.params["finetune.task"] == "sst2" and parent.data.params["finetune.lr"] == "0.003"
    assert parent.data.params["finetune.model"] == str(Path(models["teacher"]).resolve())
    assert child.data.params["finetune.seed"] == "42" and child.data.params["finetune.batch_size"] == "8"
    assert parent.data.metrics["dev_score"] == pytest.approx(report["median"]["dev_score"])
    assert parent.data.metrics["inference_seconds"] == pytest.approx(inference["seconds"])
    history = client.get_metric_history(child.info.run_id, "dev_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["dev_accuracy"] for h in seed["history"]])
    assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 4
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "finetune")} == {"finetune/report.json"}

    review = CliRunner().invoke(main, ["review", "--experiment", "ft", "--tracking-uri", uri,
                                       "--output", str(tmp_path / "cmp.png")], catch_exceptions=False)
    assert review.exit_code == 0, review.output
    row = next(line for line in review.output.splitlines() if line.strip("│ ").startswith("teacher"))
    assert f"{100 * report['median']['dev_score']:.1f}" in row
    assert (tmp_path / "cmp_glue.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "cmp.png").exists()  # only fine-tuning runs: no training comparison


def test_mnli_matched_and_mismatched_dev_and_test_predictions(models, tmp_path):
    root = tmp_path
    mm_dev = write_glue("mnli", root / "mnli" / "dev_mismatched.tsv", rows_for("mnli", 16, 5))
    mm_test = write_glue("mnli", root / "mnli" / "test_mismatched.tsv", rows_for("mnli", 7, 6), test=True)
    out = tmp_path / "out"
    result = invoke(["--model", models["student"], *task_files(root, "mnli", test=True), "--dev-mismatched",
                     str(mm_dev), "--test-mismatched", str(mm_test), "--output", str(out), *FAST, "--no-tracking",
                     "inference=false"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    dev = report["seeds"][0]["dev"]
    assert {"dev_accuracy", "dev_score", "dev_mm_accuracy", "dev_mm_score"} <= set(dev)
    assert dev["dev_score"] == dev["dev_accuracy"]  # MNLI's score: matched accuracy
    assert report["inference"] is None and report["mlflow"] is None and report["model_type"] == "distilbert"
    for name, n in (("test_predictions.tsv", 10), ("test_mismatched_predictions.tsv", 7)):
        lines = (out / name).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == n + 1
        assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(n)]
        assert {line.split("\t")[1] for line in lines[1:]} <= set(NLI)
        assert (out / "seed_42" / name).read_text() == (out / name).read_text()


@pytest.mark.parametrize("kind", ["stsb", "custom-jsonl-regression", "custom-csv-pairs", "custom-tsv-labelled-test"])
def test_regression_and_custom_tasks(kind, models, tmp_path):
    if kind == "stsb":
        args = task_files(tmp_path, "stsb", test=True)
    else:
        suffix = {"custom-jsonl-regression": ".jsonl", "custom-csv-pairs": ".csv",
                  "custom-tsv-labelled-test": ".tsv"}[kind]
        source = {"custom-jsonl-regression": "stsb", "custom-csv-pairs": "rte", "custom-tsv-labelled-test": "sst2"}[kind]
        files = {split: write_custom(tmp_path / f"{split}{suffix}", rows_for(source, n, seed), numeric=source == "stsb")
                 for split, n, seed in (("train", 40, 1), ("dev", 20, 2), ("test", 12, 3))}
        args = ["--task", "custom", "--train", str(files["train"]), "--dev", str(files["dev"]), "--test",
                str(files["test"])]
    out = tmp_path / "out"
    result = invoke(["--model", models["student"], *args, "--output", str(out), *FAST, "--no-tracking",
                     "inference_max_examples=5"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    dev = report["seeds"][0]["dev"]
    regression = kind in ("stsb", "custom-jsonl-regression")
    assert report["problem"] == ("regression" if regression else "classification")
    if regression:
        assert dev["dev_score"] == pytest.approx((dev["dev_pearson"] + dev["dev_spearman"]) / 2)
        predictions = [float(line.split("\t")[1]) for line in (out / "test_predictions.tsv").read_text().splitlines()[1:]]
        assert len(predictions) == (10 if kind == "stsb" else 12) and all(math.isfinite(p) for p in predictions)
    else:
        assert dev["dev_score"] == dev["dev_accuracy"] and "dev_f1_macro" in dev
        labels = {line.split("\t")[1] for line in (out / "test_predictions.tsv").read_text().splitlines()[1:]}
        assert labels <= set(report["labels"])
    if kind == "custom-tsv-labelled-test":  # a test file with labels is scored too
        assert set(report["seeds"][0]["test"]) >= {"test_accuracy", "test_score"}


@pytest.mark.slow
def test_several_seeds_give_the_median_and_a_child_run_each(models, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    result = invoke(["--model", models["student"], *task_files(tmp_path, "mrpc", test=True), "--output", str(out),
                     "--seeds", "3", "--epochs", "2", "--batch-size", "16", "--max-seq-len", "32", "--lr", "3e-3",
                     "--tracking-uri", uri, "--experiment", "seeds", "inference_max_examples=5"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    seeds = report["seeds"]
    assert [s["seed"] for s in seeds] == [42, 43, 44]
    for name in ("dev_score", "dev_f1", "dev_accuracy"):
        assert report["median"][name] == pytest.approx(statistics.median(s["dev"][name] for s in seeds))
    assert report["median_seed"] == median_seed([42, 43, 44], [s["dev"]["dev_score"] for s in seeds])
    assert (out / "test_predictions.tsv").read_text() == (out / f"seed_{report['median_seed']}" /
                                                           "test_predictions.tsv").read_text()
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    parent = next(r for r in runs if r.data.params.get("mode") == "finetune")
    children = [r for r in runs if r.data.params.get("mode") == "finetune-seed"]
    assert sorted(int(c.data.params["finetune.seed"]) for c in children) == [42, 43, 44]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.metrics["dev_f1"] == pytest.approx(report["median"]["dev_f1"])


@pytest.mark.slow
@pytest.mark.parametrize("task", GLUE_ORDER)
def test_every_glue_task_fine_tunes_end_to_end(task, models, tmp_path):
    out = tmp_path / "out"
    result = invoke(["--model", models["student"], *task_files(tmp_path, task, 32, 16, test=True), "--output",
                     str(out), *FAST, "--no-tracking", "inference=false"])
    assert result.exit_code == 0, result.output
    dev = json.loads((out / "report.json").read_text())["seeds"][0]["dev"]
    assert {f"dev_{m}" for m in GLUE_TASKS[task].metrics} | {"dev_score"} <= set(dev)
    assert (out / "test_predictions.tsv").is_file()


# -- bad input: one error line, exit 2, nothing written ---------------------------------------------------


def _gpt2_folder(root: Path) -> str:
    folder = root / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 100}))
    return str(folder)


ERRORS = {
    "unknown task": (lambda m, r: ["--model", m, *task_files(r, "sst2"), "--task", "glue9"], ["glue9", "cola"]),
    "missing column": (lambda m, r: ["--model", m, "--task", "qnli", "--train", str(write_glue(
        "rte", r / "rte.tsv", rows_for("rte", 8, 1))), "--dev", str(r / "rte.tsv")], ["'question'", "rte.tsv"]),
    "unknown label": (lambda m, r: ["--model", m, "--task", "rte", "--train", str(write_glue(
        "rte", r / "t.tsv", rows_for("rte", 8, 1))), "--dev", str(write_glue(
            "rte", r / "d.tsv", [*rows_for("rte", 2, 1), ("a b", "c d", "maybe")]))],
                      ["d.tsv line 4", "'maybe' is not one of rte's labels (entailment, not_entailment)"]),
    "empty split": (lambda m, r: ["--model", m, *task_files(r, "sst2"), "--dev", str(write_glue(
        "sst2", r / "empty.tsv", []))], ["empty.tsv", "no sst2 examples"]),
    "not an encoder": (lambda m, r: ["--model", _gpt2_folder(r), *task_files(r, "sst2")], ["gpt2", "BERT-family"]),
    "no model folder": (lambda m, r: ["--model", str(r / "nope"), *task_files(r, "sst2")], ["no such folder"]),
    "mismatched for sst2": (lambda m, r: ["--model", m, *task_files(r, "sst2"), "--dev-mismatched",
                                          str(r / "sst2" / "dev.tsv")], ["mnli only"]),
    "custom dev label unseen": (lambda m, r: ["--model", m, "--task", "custom", "--train", str(write_custom(
        r / "t.jsonl", [("a good film", None, "pos"), ("a bad film", None, "neg")])), "--dev", str(write_custom(
            r / "d.jsonl", [("a fine film", None, "meh")]))], ["'meh'", "d.jsonl line 1"]),
    "custom without label": (lambda m, r: ["--model", m, "--task", "custom", "--train", str(write_custom(
        r / "t.csv", [("a", None, "1"), ("b", None, "0")])), "--dev", str(_no_label_csv(r))], ["no 'label' column"]),
    "bad setting": (lambda m, r: ["--model", m, *task_files(r, "sst2"), "seeds=0"], ["seeds=0"]),
    "unknown key": (lambda m, r: ["--model", m, *task_files(r, "sst2"), "learning_rate=1"], ["learning_rate"]),
}


def _no_label_csv(root: Path) -> Path:
    path = root / "nolabel.csv"
    path.write_text("text\nsome text\n")
    return path


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_error_line_and_writes_nothing(case, models, tmp_path):
    make_args, needles = ERRORS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    result = invoke([*make_args(models["teacher"], inputs), "--output", str(out), *FAST,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert_one_error_line(result, *needles)
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_non_empty_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = invoke(["--model", models["teacher"], *task_files(tmp_path, "sst2"), "--output", str(out), *FAST,
                     "--no-tracking"])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_inference_timing_is_one_full_pass_at_the_given_batch_size():
    """Table 3's figure: every example once (after one untimed warm-up batch), batches padded beforehand."""
    from transformers import DataCollatorWithPadding

    from distil.pretrain.finetune.model import Features, time_inference

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def forward(self, input_ids, attention_mask):
            self.shapes.append(tuple(input_ids.shape))

    class Pad:  # what DataCollatorWithPadding needs of a tokenizer
        padding_side, pad_token_id, model_input_names = "right", 0, ["input_ids", "attention_mask"]

        def pad(self, items, **kwargs):
            width = max(len(i["input_ids"]) for i in items)
            return {k: torch.tensor([i[k] + [0] * (width - len(i[k])) for i in items]) for k in items[0]}

    lengths = [3, 5, 4, 7, 2]
    features = Features({"input_ids": [[1] * n for n in lengths], "attention_mask": [[1] * n for n in lengths]}, None)
    model = Recorder()
    collator = DataCollatorWithPadding(Pad())
    timing = time_inference(model, features, collator, torch.device("cpu"), 1)
    assert model.shapes == [(1, 3), *[(1, n) for n in lengths]]  # warm-up, then each example unpadded
    assert timing["examples"] == 5 and timing["batch_size"] == 1 and timing["seconds"] > 0
    model.shapes.clear()
    timing = time_inference(model, features, collator, torch.device("cpu"), 2, max_examples=4)
    assert model.shapes == [(2, 5), (2, 5), (2, 7)] and timing["examples"] == 4


def test_any_encoder_folder_gets_a_fresh_head_but_missing_encoder_weights_are_refused(models, tmp_path):
    """A bare BertModel and a classifier fine-tuned on another task (3 labels) load with a new head; a folder
    whose encoder weights are partly missing is an error, not a silently random encoder."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from distil.common.errors import UserError
    from distil.pretrain.finetune.model import load_for_task

    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    bare = AutoModel.from_pretrained(models["teacher"])
    bare.save_pretrained(str(tmp_path / "bare"))
    three = AutoModelForSequenceClassification.from_pretrained(models["teacher"], num_labels=3)
    three.save_pretrained(str(tmp_path / "three"))
    for name in ("bare", "three"):
        tokenizer.save_pretrained(str(tmp_path / name))
        model = load_for_task(str(tmp_path / name), GLUE_TASKS["sst2"], seed=0)
        assert model.num_labels == 2 and model.classifier.out_features == 2
        assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, bare.encoder.layer[1].output.dense.weight)
    partial = tmp_path / "partial"
    bare.save_pretrained(str(partial))
    weights = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="encoder's weights are missing"):
        load_for_task(str(partial), GLUE_TASKS["sst2"], seed=0)



def test_the_opening_sentence_sample_task(tmp_path):
    """The quickstart's task: a paragraph's first sentence is `opening`, another of its sentences `later`;
    one example per paragraph, train and dev from disjoint paragraphs; the same corpus and seed give the
    same files."""
    from distil.pretrain.finetune.sample_task import paragraph_sentences, write_opening_sentence_task

    lines = [f"Topic {i} opens here with several words. Then topic {i} goes on for a while. It ends at {i} now."
             for i in range(80)] + ["One short sentence only, not used at all here."]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    assert len(paragraph_sentences(corpus)) == 80
    paths = write_opening_sentence_task(corpus, tmp_path / "a", n_train=1000, n_dev=15, seed=3)
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert len(rows["train"]) == 65 and len(rows["dev"]) == 15  # one per paragraph

    def topic(sentence: str) -> str:
        return next(word for word in sentence.replace(".", " ").split() if word.isdigit())

    for split in ("train", "dev"):
        for row in rows[split]:
            assert row["label"] == ("opening" if " opens here " in row["text"] else "later")
        assert {r["label"] for r in rows[split]} == {"opening", "later"}
        assert len({topic(r["text"]) for r in rows[split]}) == len(rows[split])
    assert {topic(r["text"]) for r in rows["train"]}.isdisjoint(topic(r["text"]) for r in rows["dev"])
    again = write_opening_sentence_task(corpus, tmp_path / "b", n_train=1000, n_dev=15, seed=3)
    assert all(again[k].read_text() == paths[k].read_text() for k in paths)


def test_settings_come_from_the_config_file_then_options_then_key_value(tmp_path):
    from distil.pretrain.finetune.run import load_finetune_config

    config = tmp_path / "ft.yaml"
    config.write_text("task: rte\nseeds: 3\nlr: 1.0e-4\nepochs: 2\nwarmup_ratio: 0.1\noutput: from-file\n")
    options = {"model": "m", "task": None, "train": "t.tsv", "dev": "d.tsv", "dev_mismatched": None, "test": None,
               "test_mismatched": None, "output": None, "seeds": 4, "epochs": None, "lr": None, "batch_size": None,
               "max_seq_len": None, "name": None, "teacher": None, "device": None, "overwrite": False,
               "tracking_uri": None, "experiment": None, "no_tracking": True}
    cfg = load_finetune_config(str(config), ("lr=3e-4", "inference_threads=2"), options)
    assert (cfg.task, cfg.seeds, cfg.lr, cfg.epochs, cfg.warmup_ratio) == ("rte", 4, 3e-4, 2, 0.1)
    assert (cfg.output, cfg.inference_threads, cfg.tracking, cfg.batch_size) == ("from-file", 2, False, 32)
    assert cfg.seed_list == [42, 43, 44, 45]
