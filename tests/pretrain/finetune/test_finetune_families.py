"""Every family distil pretrains gets its task heads in `distil finetune`: a tiny masked LM of each family, with
a tokenizer of its own kind, fine-tunes on a sentence task, SQuAD and CoNLL, and the saved model is that
family's own head class."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from family_tokenizers import bpe_tokenizer, unigram_tokenizer
from finetune_helpers import (
    conll_sentences,
    make_models,
    qa_items,
    rows_for,
    squad_json,
    vocabulary_text,
    write_conll,
    write_glue,
)
from trainer_helpers import tiny_teacher

from distil.pretrain.cli import main

FAMILIES = ("roberta", "xlm-roberta", "modernbert", "distilbert")
HEADS = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "modernbert": "ModernBert", "distilbert": "DistilBert"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A saved masked LM per family with its tokenizer (BPE for RoBERTa, Unigram for XLM-R, WordPiece else)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    wordpiece = make_models(root / "bert")["teacher"]
    lines = vocabulary_text()
    out = {}
    for family in FAMILIES:
        folder = root / family
        folder.mkdir()
        if family == "roberta":
            bpe_tokenizer(folder, lines)
        elif family == "xlm-roberta":
            unigram_tokenizer(folder, lines)
        else:
            AutoTokenizer.from_pretrained(wordpiece).save_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        tiny_teacher(family, vocab=len(tok), layers=2).save_pretrained(str(folder))
        out[family] = str(folder)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_fine_tunes_on_sentences_squad_and_conll(family, folders, tmp_path):
    files = {"sst2": ["--train", str(write_glue("sst2", tmp_path / "t.tsv", rows_for("sst2", 24, 1))),
                      "--dev", str(write_glue("sst2", tmp_path / "d.tsv", rows_for("sst2", 8, 2)))],
             "squad": ["--train", str(squad_json(tmp_path / "t.json", qa_items(24, 1))),
                       "--dev", str(squad_json(tmp_path / "d.json", qa_items(8, 2)))],
             "conll": ["--train", str(write_conll(tmp_path / "t.txt", conll_sentences(24, 1))),
                       "--dev", str(write_conll(tmp_path / "d.txt", conll_sentences(8, 2)))]}
    heads = {"sst2": "ForSequenceClassification", "squad": "ForQuestionAnswering", "conll": "ForTokenClassification"}
    for task, args in files.items():
        out = tmp_path / task
        result = CliRunner().invoke(main, ["finetune", "--model", folders[family], "--task", task, *args, "--output",
                                           str(out), "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                                           "--max-seq-len", "48", "doc_stride=16", "max_query_len=12",
                                           "inference=false", "save_models=true", "--no-tracking"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, (task, result.output)
        report = json.loads((out / "report.json").read_text())
        assert report["model_type"] == family and "dev_score" in report["median"], (task, report["median"])
        config = json.loads((out / "seed_42" / "model" / "config.json").read_text())
        assert config["architectures"] == [f"{HEADS[family]}{heads[task]}"], (task, config["architectures"])
