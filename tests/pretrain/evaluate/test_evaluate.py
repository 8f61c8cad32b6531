"""`distil evaluate`: metrics checked against an independent computation on the same held-out batches, the
JSON report, the MLflow runs (a temp SQLite store) and the one-line errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
)

from distil.data_pipeline.manifest import TOKEN_COUNTS_NAME, Manifest, load_manifest
from distil.data_pipeline.masking import MaskingConfig
from distil.data_pipeline.stream.loader import PretrainStream
from distil.pretrain.cli import main

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew potent elixirs under an "
         "amber moon and distant rivers carry stories of ancient kingdoms toward the sea").split()
BATCHES, BATCH_SIZE, SEED = 3, 8, 5


def prepare(root: Path, name: str, holdout: float) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(240)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    args = ["prepare", "-q", "-i", str(corpus), "-o", str(root / name), "--train-tokenizer", "200",
            "--max-seq-len", "48", "--workers", "1", "--shard-size-mb", "0.05"]
    if holdout:
        args += ["--holdout-fraction", str(holdout)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / name


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("data"), "shards", holdout=0.3)


def save(model: torch.nn.Module, folder: Path, shards: Path) -> str:
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(shards / "tokenizer")).save_pretrained(str(folder))
    return str(folder)


def bert_config(manifest: Manifest, **overrides) -> BertConfig:
    values = dict(vocab_size=manifest.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, pad_token_id=manifest.special_tokens.pad)
    return BertConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def models(shards, tmp_path_factory) -> dict[str, str]:
    """A tiny BERT teacher and DistilBERT student (random weights, different seeds, output biases set to the
    log token frequencies so that top-1/top-5 and agreement are not all zero), exported as distil train does:
    save_pretrained + the shards' tokenizer."""
    root = tmp_path_factory.mktemp("models")
    manifest = load_manifest(shards)[0]
    torch.manual_seed(0)
    teacher = BertForMaskedLM(bert_config(manifest))
    torch.manual_seed(1)
    student = DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=manifest.vocab_size, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64,
        pad_token_id=manifest.special_tokens.pad))
    log_freq = torch.from_numpy(np.load(shards / TOKEN_COUNTS_NAME)).float().add(1).log()
    with torch.no_grad():
        teacher.cls.predictions.bias.copy_(2 * log_freq)
        student.vocab_projector.bias.copy_(2 * log_freq + 2 * torch.randn_like(log_freq))
    return {"teacher": save(teacher, root / "teacher" / "export", shards),
            "student": save(student, root / "student" / "export", shards)}


def independent_metrics(shards: Path, teacher_dir: str, student_dir: str,
                        masking: MaskingConfig | None = None) -> dict[str, dict[str, float]]:
    """The same batches, computed the plain way: full-vocabulary logits, CE with ignore_index, KLDivLoss."""
    stream = PretrainStream(str(shards), split="holdout", batch_size=BATCH_SIZE, masking=masking or MaskingConfig(),
                            seed=SEED, num_workers=0)
    batches = [b for _, b in zip(range(BATCHES), stream, strict=False)]
    out: dict[str, dict[str, float]] = {}
    logits_of = {}
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        model = AutoModelForMaskedLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        flat = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in logits])
        labels = torch.cat([b["labels"].reshape(-1) for b in batches])
        keep = labels != -100
        rows, targets = flat[keep], labels[keep]
        rank = (rows > rows.gather(1, targets[:, None])).sum(dim=1)  # how many logits beat the target
        out[name] = {"mlm_loss": F.cross_entropy(flat, labels, ignore_index=-100).item(),
                     "top1_accuracy": (rank < 1).float().mean().item(),
                     "top5_accuracy": (rank < 5).float().mean().item(),
                     "num_parameters": sum(p.numel() for p in model.parameters()),
                     "masked_tokens": int(keep.sum())}
        logits_of[name] = rows
    t, s = logits_of["teacher"], logits_of["student"]
    out["student"]["kl_from_teacher"] = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s, -1), F.softmax(t, -1)).item()
    out["student"]["teacher_agreement"] = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    return out


def invoke(args: list[str]):
    return CliRunner().invoke(main, ["evaluate", *args], catch_exceptions=False)


def test_metrics_report_and_mlflow_runs(shards, models, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report_path = tmp_path / "out" / "report.json"
    result = invoke(["--teacher", models["teacher"], "--model", models["student"], "--shards", str(shards),
                     "--max-batches", str(BATCHES), "--batch-size", str(BATCH_SIZE), "--seed", str(SEED),
                     "--device", "cpu", "--output", str(report_path), "--tracking-uri", store,
                     "--experiment", "evals"])
    assert result.exit_code == 0, result.output
    assert "KL(t||s)" in result.output and "student" in result.output
    report = json.loads(report_path.read_text())
    assert report["batches"] == BATCHES and report["split"] == "holdout" and report["teacher"] == "teacher"
    by_name = {m["name"]: m for m in report["models"]}
    assert [m["name"] for m in report["models"]] == ["teacher", "student"]
    expected = independent_metrics(shards, models["teacher"], models["student"])
    for name, values in expected.items():
        got = by_name[name]
        for key, value in values.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        assert got["perplexity"] == pytest.approx(math.exp(values["mlm_loss"]), rel=1e-4)
        assert 0 <= got["top1_accuracy"] <= got["top5_accuracy"] <= 1
        assert got["tokens_per_s"] > 0 and got["tokens"] == report["tokens"]
    assert by_name["teacher"]["kl_from_teacher"] is None and by_name["student"]["kl_from_teacher"] > 0
    assert 0 < by_name["student"]["teacher_agreement"] < 1 and by_name["teacher"]["top5_accuracy"] > 0
    assert by_name["teacher"]["role"] == "teacher" and by_name["student"]["model_type"] == "distilbert"

    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("evals")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"evaluate", "eval-teacher", "eval-student"}
    parent = runs["evaluate"]
    assert report["mlflow"]["run_id"] == parent.info.run_id and parent.info.status == "FINISHED"
    assert report["mlflow"]["tracking_uri"] and report["mlflow"]["tracking_uri"].startswith(("http", "sqlite"))
    local = client.download_artifacts(parent.info.run_id, "eval/report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == report
    for name in ("teacher", "student"):
        run = runs[f"eval-{name}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["mode"] == "eval"
        assert run.data.tags["distil.num_parameters"] == str(by_name[name]["num_parameters"])
        assert run.data.metrics["eval_mlm_loss"] == pytest.approx(by_name[name]["mlm_loss"])
        assert run.data.metrics["eval_top5_accuracy"] == pytest.approx(by_name[name]["top5_accuracy"])
    assert runs["eval-student"].data.metrics["eval_kl_from_teacher"] == pytest.approx(
        by_name["student"]["kl_from_teacher"])
    # lineage and links: the held-out split as every run's dataset, each model as its run's input
    for name in ("evaluate", "eval-teacher", "eval-student"):
        tracked = client.get_run(runs[name].info.run_id)
        assert [d.dataset.name for d in tracked.inputs.dataset_inputs] == ["shards:holdout"]
        assert tracked.data.tags["mlflow.source.name"] == "distil evaluate"
    model_inputs = [client.get_run(runs[f"eval-{n}"].info.run_id).inputs.model_inputs for n in ("teacher", "student")]
    assert [len(m) for m in model_inputs] == [1, 1] and model_inputs[0][0].model_id != model_inputs[1][0].model_id
    link = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert report["mlflow"]["experiment_url"] == link and f"MLflow: {link}" in result.output

    review = CliRunner().invoke(main, ["review", "--experiment", "evals", "--tracking-uri", store, "--filter",
                                       "params.mode = 'eval'", "--output", str(tmp_path / "cmp.png")])
    assert review.exit_code == 0, review.output
    assert "2 run(s)" in review.output and "eval_mlm_loss" in review.output.replace("\n", "")


def test_no_tracking_same_batches_for_every_model(shards, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = invoke(["--model", models["student"], "--model", models["student"], "--shards", str(shards),
                     "--max-batches", "2", "--batch-size", "4", "--device", "cpu", "--no-tracking"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval_report.json").read_text())
    first, second = report["models"]
    assert (first["name"], second["name"]) == ("student", "student-2")
    for key in ("mlm_loss", "top1_accuracy", "top5_accuracy", "masked_tokens"):
        assert first[key] == second[key]
    assert first["kl_from_teacher"] is None and report["mlflow"] is None
    assert not (tmp_path / "runs").exists()  # nothing tracked
    assert not list(tmp_path.glob(".eval_report.json.*"))  # no temp file left


def test_mask_smoothing_selects_the_masked_tokens(shards, models, tmp_path):
    """--mask-smoothing 0 masks uniformly (BERT's way): the metrics match batches masked that way, and differ
    from the default (the recipe's count^-0.7, which favours rare tokens)."""
    args = ["--teacher", models["teacher"], "--model", models["student"], "--shards", str(shards), "--max-batches",
            str(BATCHES), "--batch-size", str(BATCH_SIZE), "--seed", str(SEED), "--device", "cpu", "--no-tracking"]
    assert invoke([*args, "--mask-smoothing", "0", "--output", str(tmp_path / "u.json")]).exit_code == 0
    assert invoke([*args, "--output", str(tmp_path / "d.json")]).exit_code == 0
    uniform, default = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("u", "d"))
    assert (uniform["mask_smoothing"], default["mask_smoothing"]) == (0.0, 0.7)
    expected = independent_metrics(shards, models["teacher"], models["student"], MaskingConfig(smoothing=0.0))
    for got in uniform["models"]:
        assert got["mlm_loss"] == pytest.approx(expected[got["name"]]["mlm_loss"], rel=1e-4)
    assert uniform["models"][0]["mlm_loss"] != pytest.approx(default["models"][0]["mlm_loss"], rel=1e-3)


def expect_error(args: list[str], *needles: str) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--no-tracking", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_errors(shards, models, tmp_path):
    manifest = load_manifest(shards)[0]
    base = ["--shards", str(shards), "--output", str(tmp_path / "r.json")]
    expect_error([*base, "--model", str(tmp_path / "nope")], "no such folder")
    (tmp_path / "empty").mkdir()
    expect_error([*base, "--model", str(tmp_path / "empty")], "config.json")
    GPT2Config(vocab_size=manifest.vocab_size, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    expect_error([*base, "--model", str(tmp_path / "gpt2")], "not a masked-LM")
    BertModel(bert_config(manifest)).save_pretrained(tmp_path / "bare")
    expect_error([*base, "--model", str(tmp_path / "bare")], "masked-LM head")
    save(BertForMaskedLM(bert_config(manifest, vocab_size=manifest.vocab_size + 8)), tmp_path / "vocab", shards)
    expect_error([*base, "--model", str(tmp_path / "vocab")], "vocab_size")
    pad = manifest.special_tokens.pad + 1
    save(BertForMaskedLM(bert_config(manifest, pad_token_id=pad)), tmp_path / "pad", shards)
    expect_error([*base, "--model", str(tmp_path / "pad")], "pad_token_id")
    no_holdout = prepare(tmp_path, "train_only", holdout=0.0)
    expect_error(["--shards", str(no_holdout), "--model", models["student"]], "--holdout-fraction")
    expect_error([*base, "--model", models["student"], "--max-batches", "0"], "--max-batches")
    expect_error([*base, "--model", models["student"], "--mask-smoothing", "-1"], "--mask-smoothing")
    result = CliRunner().invoke(main, ["evaluate", *base, "--model", models["student"], "--tracking-uri", "nowhere"])
    assert result.exit_code == 2 and "--tracking-uri" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_unreachable_tracking_server_does_not_fail_the_evaluation(shards, models, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = invoke(["--model", models["student"], "--shards", str(shards), "--max-batches", "1", "--device", "cpu",
                     "--tracking-uri", f"http://127.0.0.1:{port}", "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["mlflow"]["run_id"] is None and report["models"][0]["masked_tokens"] > 0
    assert "not tracked" in result.stderr
