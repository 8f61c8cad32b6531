"""`distil finetune --task squad | squad_v2`: the official scores on hand-computed cases, SQuAD files read and
checked, windows over long contexts whose labels give the answer back, answers read back from logits, and
end to end: a model learns a span task, writes predictions in the official layout, answers the same when loaded
again (AutoModelForQuestionAnswering), and a student that sees no answers learns them from a fine-tuned teacher."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from finetune_helpers import (
    FILLERS,
    NEGATIVE,
    POSITIVE,
    SUBJECTS,
    assert_one_error_line,
    make_models,
    qa_items,
    squad_json,
)

from distil.common.errors import UserError
from distil.pretrain.cli import main
from distil.pretrain.finetune.qa import (
    QAExample,
    exact_match,
    make_features,
    normalize_answer,
    predict_answers,
    read_squad,
    squad_scores,
    token_f1,
)

FAST = ["--seeds", "1", "--batch-size", "8", "--max-seq-len", "48", "doc_stride=16", "max_query_len=12",
        "max_answer_len=4", "inference=false"]
WORDS = (*POSITIVE, *NEGATIVE)


# -- scores ----------------------------------------------------------------------------------------------------


def test_answers_are_normalised_as_the_official_script_does():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE fig.") == "apple pear and fig"
    assert normalize_answer("theatre") == "theatre"  # articles are whole words only


def test_exact_match_and_f1_on_hand_computed_cases():
    assert exact_match("the cat", "Cat.") == 1.0
    # "cat sat" against "cat sat on": 2 common tokens, precision 1, recall 2/3 -> F1 0.8
    assert token_f1("the cat sat", "a cat sat on") == pytest.approx(0.8)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0  # v2.0: empty against empty
    assert token_f1("", "the", version="squad") == 0.0  # v1.1 has no empty special case


def test_the_scores_take_the_best_gold_answer_and_split_has_and_no_answer():
    examples = [QAExample("q1", "?", "ctx", [{"text": "a cat sat on", "answer_start": 0},
                                               {"text": "dog", "answer_start": 0}]),
                QAExample("q2", "?", "ctx", [{"text": "red", "answer_start": 0}]),
                QAExample("q3", "?", "ctx", []),
                QAExample("q4", "?", "ctx", [])]
    predictions = {"q1": "the cat sat", "q2": "red", "q3": "", "q4": "blue"}
    v2 = squad_scores(examples, predictions, "squad_v2")
    assert v2["exact"] == pytest.approx((0 + 1 + 1 + 0) / 4)
    assert v2["f1"] == pytest.approx((0.8 + 1 + 1 + 0) / 4)
    assert v2["HasAns_exact"] == pytest.approx(0.5) and v2["HasAns_f1"] == pytest.approx(0.9)
    assert v2["NoAns_exact"] == pytest.approx(0.5) and v2["NoAns_total"] == 2.0
    v1 = squad_scores(examples[:2], {"q1": "dog", "q2": "a red"}, "squad")
    assert v1 == {"exact": 1.0, "f1": 1.0}


# -- files -------------------------------------------------------------------------------------------------------


def test_a_misplaced_answer_names_the_file_and_the_line(tmp_path):
    path = squad_json(tmp_path / "bad.json", [("the film was good", "what was the film ?", [("good", 13)]),
                                              ("the plot was dull", "what was the plot ?", [("dull", 3)])])
    with pytest.raises(UserError) as error:
        read_squad(str(path), kind="train", version="squad")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"q1"' in text)
    assert str(error.value).startswith(f"{path} line {line}: question 'q1': answer 'dull' is not at answer_start 3")


def test_a_dev_file_with_several_gold_answers_is_scored_against_the_best_one(tmp_path):
    """SQuAD's dev files give up to three gold answers per question (one per annotator)."""
    context = "The Norman conquest of England began in 1066 under William."
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "When did it begin?", "answers": [
            {"text": "1066", "answer_start": 40}, {"text": "in 1066", "answer_start": 37},
            {"text": "began in 1066", "answer_start": 31}]},
        {"id": "b", "question": "Under whom?", "answers": [
            {"text": "William", "answer_start": 51}, {"text": "under William", "answer_start": 45}]}]}]}]}
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(data, indent=1))
    examples = read_squad(str(path), kind="dev", version="squad")
    assert [len(e.answers) for e in examples] == [3, 2]
    scores = squad_scores(examples, {"a": "in 1066", "b": "William the Conqueror"}, "squad")
    # a: exact against the second gold; b: "william conqueror" vs "william" -> P 1/2, R 1 -> F1 2/3 (best gold)
    assert scores["exact"] == pytest.approx(0.5) and scores["f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_unanswerable_questions_need_squad_v2(tmp_path):
    path = squad_json(tmp_path / "v2.json", [("the film was good", "what was the cast ?", [])])
    with pytest.raises(UserError, match="has no answer: SQuAD v1.1 .* use --task squad_v2"):
        read_squad(str(path), kind="dev", version="squad")
    assert read_squad(str(path), kind="dev", version="squad_v2")[0].answers == []


# -- windows and answers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return make_models(tmp_path_factory.mktemp("models"))


def test_windows_over_a_long_context_hold_the_answer_where_their_labels_say(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["teacher"])
    path = squad_json(tmp_path / "long.json", qa_items(12, 5, sentences=8))
    examples = read_squad(str(path), kind="train", version="squad")
    features = make_features(tok, examples, 32, 8, 12, {"input_ids", "attention_mask", "token_type_ids"}, labelled=True)
    assert len(features) > len(examples)  # 8 sentences do not fit one 32-token window
    found = set()
    for row, e in enumerate(features.example_index):
        assert len(features.encodings["input_ids"][row]) <= 32
        s, t = features.encodings["start_positions"][row], features.encodings["end_positions"][row]
        offsets = features.offsets[row]
        if s == 0:
            assert t == 0  # the answer is not wholly in this window: the first token
            continue
        assert examples[e].context[offsets[s][0]:offsets[t][1]] == examples[e].answers[0]["text"]
        found.add(e)
    assert found == set(range(len(examples)))  # every answer is labelled in some window

    # answers read back from logits that point at the labelled tokens, over every window of a question
    width = max(len(ids) for ids in features.encodings["input_ids"])
    start, end = np.zeros((len(features), width)), np.zeros((len(features), width))
    for row in range(len(features)):
        start[row, features.encodings["start_positions"][row]] += 5
        end[row, features.encodings["end_positions"][row]] += 5
    predicted = predict_answers(examples, features, start, end, version="squad")
    assert predicted == {e.id: e.answers[0]["text"] for e in examples}
    # v2.0: a first-token (null) score above every span's gives ""
    start[:, 0] += 20
    assert set(predict_answers(examples, features, start, end, version="squad_v2").values()) == {""}


def test_the_span_distillation_loss_is_its_formula_in_fp64_with_padding_left_out():
    import torch

    from distil.pretrain.finetune.qa_run import span_distillation_loss

    torch.manual_seed(0)
    n, width, t = 5, 9, 2.0
    lengths = [9, 7, 5, 9, 3]
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths])
    s_start, s_end, t_start, t_end = (torch.randn(n, width, dtype=torch.float64) * 3 for _ in range(4))
    gold_start, gold_end = torch.tensor([1, 2, 0, 8, 2]), torch.tensor([3, 6, 0, 8, 2])
    total, soft, task = span_distillation_loss(s_start, s_end, t_start, t_end, gold_start, gold_end, mask, 0.3, 0.7, t)

    def kl(s_row, t_row):  # over the window's own tokens only
        p_t = torch.softmax(t_row / t, -1)
        return float((p_t * (p_t.log() - torch.log_softmax(s_row / t, -1))).sum()) * t * t

    def kl_t(s_row, t_row):  # the same in fp64 autograd
        p_t = torch.softmax(t_row / t, -1)
        return (p_t * (p_t.log() - torch.log_softmax(s_row / t, -1))).sum() * t * t

    def ce(s_row, gold):
        return float(-torch.log_softmax(s_row, -1)[gold])

    want_soft = sum((kl(s_start[i, :k], t_start[i, :k]) + kl(s_end[i, :k], t_end[i, :k])) / 2
                    for i, k in enumerate(lengths)) / n
    want_task = sum((ce(s_start[i, :k], gold_start[i]) + ce(s_end[i, :k], gold_end[i])) / 2
                    for i, k in enumerate(lengths)) / n
    assert soft.item() == pytest.approx(want_soft, rel=1e-5) and task.item() == pytest.approx(want_task, rel=1e-5)
    assert total.item() == pytest.approx(0.3 * want_soft + 0.7 * want_task, rel=1e-5)

    # fp16 logits under fp16's loss scale: each row's gradient is the fp64 one to fp16's precision
    half = s_start.half().requires_grad_()
    loss, _, _ = span_distillation_loss(half, s_end.half(), t_start.half(), t_end.half(), gold_start, gold_end, mask,
                                        0.5, 0.5, t)
    (loss * 2.0**16).backward()
    ref = s_start.half().double().requires_grad_()  # the same inputs, the loss from its definition in fp64
    ref_loss = sum(0.5 * (kl_t(ref[i, :k], t_start.half().double()[i, :k])
                          + kl_t(s_end.half().double()[i, :k], t_end.half().double()[i, :k])) / 2
                   + 0.5 * (-torch.log_softmax(ref[i, :k], -1)[gold_start[i]]
                            - torch.log_softmax(s_end.half().double()[i, :k], -1)[gold_end[i]]) / 2
                   for i, k in enumerate(lengths)) / n
    (ref_loss * 2.0**16).backward()
    eps = torch.finfo(torch.float16).eps
    for row in range(n):
        assert torch.isfinite(half.grad[row]).all()
        assert torch.allclose(half.grad[row].double(), ref.grad[row], rtol=4 * eps, atol=4 * eps * ref.grad.abs().max())
        assert (half.grad[row, lengths[row]:] == 0).all()  # no gradient reaches padding


# -- end to end ------------------------------------------------------------------------------------------------


def run(args: list[str]):
    return CliRunner().invoke(main, ["finetune", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("squad")
    return {"train": str(squad_json(root / "train.json", qa_items(800, 1))),
            "dev": str(squad_json(root / "dev.json", qa_items(40, 2))),
            "train_v2": str(squad_json(root / "train_v2.json", qa_items(800, 3, unanswerable=0.3))),
            "dev_v2": str(squad_json(root / "dev_v2.json", qa_items(40, 4, unanswerable=0.3))), "root": str(root)}


def test_a_model_learns_spans_writes_official_predictions_and_answers_when_loaded_again(models, qa_files, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "teacher-squad"
    result = run(["--model", models["teacher"], "--task", "squad", "--train", qa_files["train"], "--dev",
                  qa_files["dev"], "--output", str(out), *FAST, "--epochs", "8", "--lr", "3e-3", "save_models=true",
                  "--tracking-uri", uri, "--experiment", "qa"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "squad" and report["problem"] == "question-answering"
    assert report["data"]["train"]["examples"] == 800
    dev = report["median"]
    # one of the context's 4 sentiment words, guessed, would be right 1 time in 4
    assert dev["dev_exact"] >= 0.7 and dev["dev_f1"] >= dev["dev_exact"], report["seeds"][0]["history"]
    predictions = json.loads((out / "predictions.json").read_text())
    examples = read_squad(qa_files["dev"], kind="dev", version="squad")
    assert set(predictions) == {e.id for e in examples} and all(isinstance(v, str) for v in predictions.values())
    assert squad_scores(examples, predictions, "squad")["exact"] == pytest.approx(dev["dev_exact"])

    # the saved model answers through AutoModelForQuestionAnswering and distil's answer search, as on the dev set
    # (transformers 5 removed its question-answering pipeline)
    from transformers import AutoModelForQuestionAnswering

    from distil.pretrain.finetune.qa import QuestionAnswerer

    saved = out / "seed_42" / "model"
    assert AutoModelForQuestionAnswering.from_pretrained(str(saved)).config.model_type == "bert"
    answerer = QuestionAnswerer(str(saved), doc_stride=16, max_query_len=12, max_answer_len=4)
    assert answerer.max_seq_len == 48 and answerer.version == "squad"
    assert {e.id: answerer(e.question, e.context) for e in examples} == json.loads(
        (out / "seed_42" / "predictions.json").read_text())

    import mlflow

    parent = mlflow.MlflowClient(uri).get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.params["finetune.task"] == "squad" and "dev_f1" in parent.data.metrics


def test_squad_v2_answers_nothing_where_nothing_is_asked_and_a_student_learns_from_the_teacher_alone(
        models, qa_files, tmp_path):
    teacher = tmp_path / "teacher"
    result = run(["--model", models["teacher"], "--task", "squad_v2", "--train", qa_files["train_v2"], "--dev",
                  qa_files["dev_v2"], "--output", str(teacher), *FAST, "--epochs", "8", "--lr", "3e-3",
                  "save_models=true", "--no-tracking"])
    assert result.exit_code == 0, result.output
    report = json.loads((teacher / "report.json").read_text())
    dev = report["median"]
    assert {"dev_HasAns_exact", "dev_NoAns_exact", "dev_HasAns_total", "dev_NoAns_total"} <= set(dev)
    assert dev["dev_exact"] >= 0.6, report["seeds"][0]["history"]
    assert dev["dev_NoAns_exact"] >= 0.5  # "" where the question's subject is not in the context

    student = tmp_path / "student"
    result = run(["--model", models["student"], "--task", "squad_v2", "--train", qa_files["train_v2"], "--dev",
                  qa_files["dev_v2"], "--output", str(student), *FAST, "--epochs", "8", "--lr", "3e-3",
                  "--no-tracking", "--distill-from", str(teacher / "seed_42" / "model"), "alpha_task=0",
                  "alpha_kd=1", "temperature=1"])
    assert result.exit_code == 0, result.output
    distilled = json.loads((student / "report.json").read_text())
    assert distilled["name"] == "student (D)" and distilled["distillation"]["alpha_task"] == 0.0
    # it never saw an answer position: what it finds, it took from the teacher's start/end logits
    assert distilled["median"]["dev_exact"] >= 0.5, distilled["seeds"][0]["history"]


@pytest.mark.parametrize("case", ["v1 teacher for v2", "test file", "stride", "stride and query", "misplaced answer"])
def test_qa_mistakes_are_one_error_line_and_write_nothing(case, models, qa_files, tmp_path):
    args = ["--model", models["student"], "--task", "squad", "--train", qa_files["train"], "--dev", qa_files["dev"]]
    needle, extra = "", []
    if case == "v1 teacher for v2":
        fake = tmp_path / "teacher"
        fake.mkdir()
        (fake / "distil_task.json").write_text(json.dumps({"task": "squad", "labels": None, "has_pair": True}))
        args = [*args[:3], "squad_v2", "--train", qa_files["train_v2"], "--dev", qa_files["dev_v2"],
                "--distill-from", str(fake)]
        needle = "was fine-tuned on squad, not squad_v2"
    elif case == "test file":
        args, needle = [*args, "--test", qa_files["dev"]], "--test is not for question answering"
    elif case == "stride":
        extra, needle = ["doc_stride=60"], "doc_stride=60 must be in (0, max_seq_len = 48)"
    elif case == "stride and query":
        extra, needle = ["doc_stride=40"], "doc_stride=40 must be below max_seq_len - max_query_len - 4 = 32"
    else:
        bad = squad_json(tmp_path / "bad.json", [("the film was good", "what was the film ?", [("good", 2)])])
        args, needle = [*args[:5], str(bad), *args[6:]], "answer 'good' is not at answer_start 2"
    out = tmp_path / "out"
    result = run([*args, "--output", str(out), *FAST, "--epochs", "1", "--no-tracking", *extra])
    assert_one_error_line(result, needle)
    assert not out.exists()


def test_review_lays_out_table_2_with_the_d_student_as_its_own_row(models, qa_files, tmp_path):
    """Teacher, student and student (D) on SQuAD and IMDb in one experiment: review's Table 2 shows each with
    its EM/F1 and accuracy as the reports hold them, and the (D) row apart from the plain student's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = random.Random(7)
    imdb = {}
    for split, n in (("train", 32), ("test", 16)):
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
            (folder / f"{i}_5.txt").write_text(f"the {rng.choice(SUBJECTS)} was {rng.choice(FILLERS)} {word}")
        imdb[split] = str(tmp_path / "aclImdb" / split)
    common = [*FAST, "--epochs", "2", "--lr", "3e-3", "--tracking-uri", uri, "--experiment", "t2",
              "inference=true", "inference_max_examples=8"]
    reports = {}

    def finetune(name: str, model: str, task: str, *extra: str) -> None:
        files = (["--train", qa_files["train"], "--dev", qa_files["dev"]] if task == "squad"
                 else ["--train", imdb["train"], "--dev", imdb["test"]])
        out = tmp_path / f"{name}-{task}"
        result = run(["--model", model, "--task", task, *files, "--output", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
        reports[(name, task)] = json.loads((out / "report.json").read_text())

    for task in ("squad", "imdb"):
        finetune("teacher", models["teacher"], task, "save_models=true")
        finetune("student", models["student"], task, "--teacher", models["teacher"])
        finetune("student-d", models["student"], task, "--teacher", models["teacher"], "--distill-from",
                 str(tmp_path / f"teacher-{task}" / "seed_42" / "model"))
    review = CliRunner().invoke(main, ["review", "--experiment", "t2", "--tracking-uri", uri,
                                       "--output", str(tmp_path / "cmp.png")], catch_exceptions=False)
    assert review.exit_code == 0, review.output
    assert "Table 2" in review.output and "Table 1" not in review.output  # no GLUE task here
    rows = {line.strip("│ ").split("│")[0].strip(): line for line in review.output.splitlines() if "│" in line}
    for name, label in (("teacher", "teacher"), ("student", "student"), ("student-d", "student (D)")):
        squad, imdb_report = reports[(name, "squad")]["median"], reports[(name, "imdb")]["median"]
        row = rows[label]
        assert f"{100 * squad['dev_exact']:.1f}/{100 * squad['dev_f1']:.1f}" in row, (label, row)
        assert f"{100 * imdb_report['dev_accuracy']:.2f}" in row, (label, row)
    assert reports[("student-d", "squad")]["name"] == "student (D)"
    assert sum(line.strip("│ ").startswith("% of teacher") for line in review.output.splitlines()) == 2
    assert (tmp_path / "cmp_glue.png").read_bytes()[:4] == b"\x89PNG"
