"""Every family end to end on CPU, through the real commands: `distil prepare` with the family's kind of
tokenizer (trained here) -> `distil train` in MLM mode (a tiny teacher of the family from scratch) ->
`distil train` distilling it -> the export in transformers' fill-mask pipeline.

RoBERTa goes the whole way a user goes: a 2-process ZeRO-2 run through the DeepSpeed launcher, killed with
SIGKILL after a checkpoint and resumed to bitwise the weights of an uninterrupted run, then `distil evaluate`,
`distil finetune` and `distil review` on its student. XLM-R (a SentencePiece Unigram tokenizer), ModernBERT and
DistilBERT (WordPiece) run single-process.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_helpers import BIN, REPO, WORDS, env, free_port, run, sigkill_after_checkpoint
from family_tokenizers import unigram_tokenizer
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 12


def corpus(root: Path) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 40))) + "." for _ in range(600)]
    path = root / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(root: Path, *tokenizer: str) -> Path:
    run([str(BIN / "distil"), "prepare", "-i", str(corpus(root)), "-o", str(root / "shards"), *tokenizer,
         "--max-seq-len", "64", "--workers", "1", "--shard-size-mb", "0.05", "--holdout-fraction", "0.1", "-q"])
    return root / "shards"


def mlm_teacher(shards: Path, out: Path, family: str) -> Path:
    """A tiny teacher of `family` pretrained from scratch in MLM mode (one process)."""
    run([str(BIN / "distil"), "train", "--config", "configs/tiny_mlm_cpu.yaml", f"model.family={family}",
         "model.hidden_size=32", "model.num_hidden_layers=4", "model.num_attention_heads=4",
         "model.intermediate_size=64", "model.max_position_embeddings=64", "model.local_attention=16",
         f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=20", "run.log_every=5",
         "checkpoint.every=0"], timeout=420)
    return out / "export"


def distill_args(shards: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["configs/tiny_cpu.yaml", f"data.shards={shards}", f"teacher.path={teacher}", f"run.output_dir={out}",
            f"run.max_steps={STEPS}", "run.log_every=2", "checkpoint.every=4", "checkpoint.keep=3",
            "teacher.dtype=fp16", *extra]  # the recipe's fp16 teacher


def launch_env() -> tuple[dict[str, str], str]:
    e = env()
    port = str(free_port())
    e.update(NUM_GPUS="2", MASTER_PORT=port)
    return e, port


def distill_2proc(shards: Path, teacher: Path, out: Path) -> None:
    e, port = launch_env()
    p = subprocess.run(["bash", "launch/local.sh", *distill_args(shards, teacher, out)], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def fill_mask(export: Path) -> list[dict]:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    predictions = pipeline("fill-mask", model=model, tokenizer=tokenizer)(
        f"the cat{tokenizer.mask_token} over the tree.")
    assert len(predictions) == 5 and all(isinstance(p["token"], int) for p in predictions)
    return predictions


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("roberta")
    shards = prepare(root, "--train-tokenizer", "400", "--train-tokenizer-kind", "bpe")
    teacher = mlm_teacher(shards, root / "teacher", "roberta")
    distill_2proc(shards, teacher, root / "student")
    return {"root": root, "shards": shards, "teacher": teacher, "student": root / "student"}


def test_a_roberta_teacher_and_student_train_through_the_launcher(roberta):
    from transformers import AutoConfig

    teacher, student = AutoConfig.from_pretrained(roberta["teacher"]), AutoConfig.from_pretrained(
        roberta["student"] / "export")
    assert teacher.model_type == student.model_type == "roberta"
    assert (teacher.num_hidden_layers, student.num_hidden_layers) == (4, 2)
    assert teacher.pad_token_id == 1 and teacher.max_position_embeddings == 64 + 2  # positions from pad + 1
    lines = [json.loads(x) for x in (roberta["student"] / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_kl", "loss_mlm", "loss_cos"} <= set(lines[-1])
    curve = [x["loss"] for x in lines]
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve
    predictions = fill_mask(roberta["student"] / "export")
    assert all(p["token_str"] for p in predictions)


def test_a_roberta_run_killed_with_sigkill_resumes_to_the_same_weights(roberta, tmp_path):
    out = tmp_path / "killed"
    e, _ = launch_env()
    proc = subprocess.Popen(["bash", "launch/local.sh", *distill_args(roberta["shards"], roberta["teacher"], out)],
                            cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed_at = sigkill_after_checkpoint(proc, out, 4)  # the whole launch: launcher and both ranks, mid-run
    assert killed_at < f"step_{STEPS:08d}" and not (out / "export").exists()
    distill_2proc(roberta["shards"], roberta["teacher"], out)  # launch/local.sh resumes from the checkpoint
    a = load_file(roberta["student"] / "export" / "model.safetensors")
    b = load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluate_finetune_and_review_take_the_roberta_student(roberta, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = tmp_path / "eval.json"
    run([str(BIN / "distil"), "evaluate", "--teacher", str(roberta["teacher"]), "--model",
         str(roberta["student"] / "export"), "--shards", str(roberta["shards"]), "--max-batches", "3",
         "--device", "cpu", "--output", str(report), "--tracking-uri", uri, "--experiment", "roberta"])
    models = {m["role"]: m for m in json.loads(report.read_text())["models"]}
    assert models["teacher"]["model_type"] == models["student"]["model_type"] == "roberta"
    assert models["student"]["mlm_loss"] > 0 and 0 <= models["student"]["teacher_agreement"] <= 1

    rng = random.Random(1)
    for split, n in (("train", 48), ("dev", 24)):
        rows = [(" ".join(rng.choice(WORDS) for _ in range(8)), rng.randint(0, 1)) for _ in range(n)]
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "ft"
    run([str(BIN / "distil"), "finetune", "--model", str(roberta["student"] / "export"), "--task", "custom",
         "--train", str(tmp_path / "train.csv"), "--dev", str(tmp_path / "dev.csv"), "--output", str(out),
         "--epochs", "1", "--seeds", "1", "--batch-size", "16", "--max-seq-len", "32", "--tracking-uri", uri,
         "--experiment", "roberta", "inference_max_examples=5"])
    finetuned = json.loads((out / "report.json").read_text())
    assert 0 <= finetuned["median"]["dev_score"] <= 1
    review = run([str(BIN / "distil"), "review", "--experiment", "roberta", "--tracking-uri", uri, "--output",
                  str(tmp_path / "cmp.png")]).stdout
    mlm_row = next(line for line in review.splitlines() if "eval_mlm_loss" in line)
    assert f"{models['teacher']['mlm_loss']:.4g}" in mlm_row and f"{models['student']['mlm_loss']:.4g}" in mlm_row
    glue_row = next(line for line in review.splitlines() if line.strip("│ ").startswith("student") and "model" in line)
    assert f"{100 * finetuned['median']['dev_score']:.1f}" in glue_row, review


@pytest.mark.parametrize("family", ["xlm-roberta", "modernbert", "distilbert"])
def test_each_other_family_distils_and_its_student_fills_masks(family, tmp_path):
    if family == "xlm-roberta":  # a SentencePiece Unigram trained on the same corpus, given by folder
        text = corpus(tmp_path).read_text().splitlines()
        tokenizer = ["--tokenizer", str(unigram_tokenizer(tmp_path / "tok", text, vocab_size=300))]
    else:
        tokenizer = ["--train-tokenizer", "400"]
    shards = prepare(tmp_path, *tokenizer)
    teacher = mlm_teacher(shards, tmp_path / "teacher", family)
    out = tmp_path / "student"
    run([str(BIN / "distil"), "train", "--config", *distill_args(shards, teacher, out, "run.max_steps=6",
                                                                  "engine.gradient_accumulation_steps=1")],
        timeout=420)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out / "export")
    assert config.model_type == family and config.num_hidden_layers == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] == x["loss"] for x in lines) and {"loss_kl", "loss_cos"} <= set(lines[-1])
    fill_mask(out / "export")
