"""`distil finetune --task conll`: CoNLL files read (-DOCSTART-, blank lines, the tag in the last column), tags
aligned to first sub-words, seqeval's entity scores on a hand-computed case, the distillation loss against its
formula in fp64, and end to end: a tagger learns entities, writes its predictions, and a student that sees no
tags learns them from a fine-tuned teacher; mistakes in the files are one line naming file and line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from finetune_helpers import assert_one_error_line, conll_sentences, make_models, write_conll

from distil.common.errors import UserError
from distil.pretrain.cli import main
from distil.pretrain.finetune.tagging import (
    IGNORE,
    align,
    check_tags,
    label_set,
    read_conll,
    tag_distillation_loss,
    tag_scores,
)

FAST = ["--seeds", "1", "--batch-size", "8", "--max-seq-len", "32", "--lr", "3e-3", "inference=false"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return make_models(tmp_path_factory.mktemp("models"))


def test_conll_files_read_words_and_last_column_tags(tmp_path):
    sentences = conll_sentences(3, 0)
    for columns in (4, 2):
        read = read_conll(str(write_conll(tmp_path / f"c{columns}.txt", sentences, columns)), kind="train")
        assert [list(zip(s.words, s.tags, strict=True)) for s in read] == sentences
    assert read[0].lines == [3, 4, 5, 6, 7, 8]  # after the -DOCSTART- line and its blank line
    assert label_set(read)[0] == "O" and label_set(read).index("B-NEG") < label_set(read).index("I-NEG")


def test_a_line_without_a_tag_and_an_unknown_tag_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("the O\nfilm\n")
    with pytest.raises(UserError, match=r"bad.txt line 2: 'film' has no tag"):
        read_conll(str(path), kind="train")
    dev = write_conll(tmp_path / "dev.txt", [[("the", "O"), ("film", "B-MOVIE")]])
    with pytest.raises(UserError, match=r"dev.txt line 4: tag 'B-MOVIE' is not one of the train file's tags"):
        check_tags(read_conll(str(dev), kind="dev"), ("O", "B-THING"), str(dev))


def test_each_word_tag_goes_to_its_first_sub_word_only(models):
    from transformers import AutoTokenizer

    from distil.pretrain.finetune.tagging import Sentence

    tok = AutoTokenizer.from_pretrained(models["teacher"])
    words = ["the", "goodbad", "film"]
    assert len(tok("goodbad", add_special_tokens=False)["input_ids"]) > 1  # split into sub-words
    sentence = Sentence(words, ["O", "B-POS", "O"], [1, 2, 3])
    encodings, firsts, cut = align(tok, [sentence], ("O", "B-POS"), 32, {"input_ids", "attention_mask"})
    labels = encodings["labels"][0]
    word_ids = tok([words], is_split_into_words=True)[0].word_ids
    assert cut == 0 and len(firsts[0]) == 3
    for position, (word, label) in enumerate(zip(word_ids, labels, strict=True)):
        first = word is not None and (position == 0 or word_ids[position - 1] != word)
        assert label == ([0, 1, 0][word] if first else IGNORE)
    _, _, cut = align(tok, [sentence], ("O", "B-POS"), 4, {"input_ids"})
    assert cut >= 1  # a window too short for the sentence: words cut, and counted


def test_entity_scores_are_seqevals_on_a_hand_computed_case():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    scores = tag_scores(gold, predicted)
    # entities: gold PER, LOC, ORG; predicted PER, ORG(wrong place), ORG -> 2 right of 3 each way
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(5 / 6)


def test_the_tag_distillation_loss_is_its_formula_in_fp64():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 5, 3, dtype=torch.float64) * 2, torch.randn(2, 5, 3, dtype=torch.float64) * 2
    labels = torch.tensor([[IGNORE, 1, IGNORE, 2, 0], [IGNORE, 0, 1, IGNORE, IGNORE]])
    mask = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 1, 0, 0]])  # the teacher has no logits for the first row's last word
    t = 2.0
    total, soft, task = tag_distillation_loss(logits, teacher, mask, labels, 0.4, 0.6, t)
    kls, ces = [], []
    for b in range(2):
        for i in range(5):
            if labels[b, i] == IGNORE:
                continue
            ces.append(float(-torch.log_softmax(logits[b, i], -1)[labels[b, i]]))
            if mask[b, i]:
                p = torch.softmax(teacher[b, i] / t, -1)
                kls.append(float((p * (p.log() - torch.log_softmax(logits[b, i] / t, -1))).sum()) * t * t)
    assert soft.item() == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert task.item() == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    assert total.item() == pytest.approx(0.4 * sum(kls) / len(kls) + 0.6 * sum(ces) / len(ces), rel=1e-5)


def run(args: list[str]):
    return CliRunner().invoke(main, ["finetune", *args], catch_exceptions=False)


def test_a_tagger_learns_entities_and_a_student_learns_them_from_the_teacher_alone(models, tmp_path):
    train = write_conll(tmp_path / "train.txt", conll_sentences(160, 1))
    dev = write_conll(tmp_path / "dev.txt", conll_sentences(40, 2))
    teacher = tmp_path / "teacher"
    result = run(["--model", models["teacher"], "--task", "conll", "--train", str(train), "--dev", str(dev),
                  "--output", str(teacher), *FAST, "--epochs", "6", "save_models=true", "--no-tracking"])
    assert result.exit_code == 0, result.output
    report = json.loads((teacher / "report.json").read_text())
    assert report["problem"] == "token-tagging" and report["labels"][0] == "O"
    assert report["data"]["dev"]["sentences"] == 40 and report["data"]["dev"]["words_cut"] == 0
    assert report["median"]["dev_f1"] >= 0.8, report["seeds"][0]["history"]
    assert report["median"]["dev_score"] == report["median"]["dev_f1"]
    lines = (teacher / "predictions.txt").read_text().split("\n\n")[0].splitlines()
    assert [line.split()[:2] for line in lines] == [[w, t] for w, t in conll_sentences(40, 2)[0]]

    from transformers import AutoModelForTokenClassification

    saved = AutoModelForTokenClassification.from_pretrained(str(teacher / "seed_42" / "model"))
    assert saved.config.id2label[0] == "O" and len(saved.config.id2label) == len(report["labels"])

    student = tmp_path / "student"
    result = run(["--model", models["student"], "--task", "conll", "--train", str(train), "--dev", str(dev),
                  "--output", str(student), *FAST, "--epochs", "6", "--no-tracking", "--distill-from",
                  str(teacher / "seed_42" / "model"), "alpha_task=0", "alpha_kd=1", "temperature=1"])
    assert result.exit_code == 0, result.output
    distilled = json.loads((student / "report.json").read_text())
    assert distilled["name"] == "student (D)" and distilled["distillation"]["alpha_task"] == 0.0
    assert distilled["median"]["dev_f1"] >= 0.6, distilled["seeds"][0]["history"]


@pytest.mark.parametrize("case", ["missing tag", "unknown dev tag", "other tags in the teacher"])
def test_tagging_mistakes_are_one_error_line_and_write_nothing(case, models, tmp_path):
    train = write_conll(tmp_path / "train.txt", conll_sentences(8, 1))
    dev = write_conll(tmp_path / "dev.txt", conll_sentences(4, 2))
    extra: list[str] = []
    if case == "missing tag":
        dev.write_text(dev.read_text().replace("was NN I-NP O", "was", 1))
        needle = "dev.txt line"
    elif case == "unknown dev tag":
        dev.write_text(dev.read_text().replace("B-THING", "B-MOVIE", 1))
        needle = "tag 'B-MOVIE' is not one of the train file's tags"
    else:
        fake = tmp_path / "fake"
        fake.mkdir()
        (fake / "distil_task.json").write_text(json.dumps({"task": "conll", "labels": ["O", "B-PER"],
                                                          "has_pair": False}))
        extra, needle = ["--distill-from", str(fake)], "predicts labels (O, B-PER)"
    out = tmp_path / "out"
    result = run(["--model", models["student"], "--task", "conll", "--train", str(train), "--dev", str(dev),
                  "--output", str(out), *FAST, "--epochs", "1", "--no-tracking", *extra])
    assert_one_error_line(result, needle)
    assert not out.exists()
