"""End to end on CPU: `distil prepare` shards, an MLM-mode teacher, then a 2-process ZeRO-2 distillation
launched through the deepspeed launcher (DS_ACCELERATOR=cpu, gloo); its loss falls, its export loads in
transformers, and an interrupted + resumed run gives bitwise the same weights as an uninterrupted one.

DeepSpeed launches are few (4) because each costs seconds of imports; the first one on a machine also
compiles DeepSpeed's CPU shared-memory op into TORCH_EXTENSIONS_DIR (about a minute, cached after).
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import BIN, REPO, env, free_port, make_shards
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_run(shards, tmp_path_factory) -> Path:
    """MLM mode: a tiny BERT teacher trained from scratch. Started as a single process (`python -m
    pretrain.train`), stopped by SIGTERM once it has logged, then resumed under torchrun (launch/torchrun.sh).
    Without ZeRO (stage 0), the path where DeepSpeed keeps no gradient norm; the distillation runs use ZeRO-2."""
    out = tmp_path_factory.mktemp("teacher")
    args = ["--config", "configs/tiny_mlm_cpu.yaml", f"data.shards={shards}", f"run.output_dir={out}",
            "run.max_steps=40", "run.log_every=5", "checkpoint.every=100", "engine.zero_stage=0"]
    proc = subprocess.Popen([sys.executable, "-m", "distil.pretrain.train", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no metrics line within 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    stopped_at = (out / "checkpoints" / "latest").read_text().strip()
    assert 5 <= int(stopped_at.split("_")[1]) < 40 and not (out / "export").exists()
    e = env()
    e.update(NPROC_PER_NODE="1")
    p = subprocess.run(["bash", "launch/torchrun.sh", *args[1:]], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return out


def distill(shards: Path, teacher: Path, out: Path, *extra: str, status: int = 0) -> None:
    """2 processes through the deepspeed launcher (launch/local.sh: resumes when a checkpoint exists).
    `status`: the expected exit status (3: stopped by run.stop_after_steps with more to do)."""
    e = env()
    port = str(free_port())
    e.update(NUM_GPUS="2", MASTER_PORT=port)
    cmd = ["bash", "launch/local.sh", "configs/tiny_cpu.yaml", f"data.shards={shards}",
           f"teacher.path={teacher / 'export'}", f"run.output_dir={out}", "run.max_steps=16", "run.log_every=2",
           "checkpoint.every=4", "checkpoint.keep=2", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=420)
    assert p.returncode == status, p.stdout[-3000:] + p.stderr[-5000:]
    # DeepSpeed's CPU all-reduce segments (66 MB of memory each) went with the ranks.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.fixture(scope="module")
def student_run(shards, teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    distill(shards, teacher_run, out)
    return out


def test_mlm_mode_pretrains_a_teacher_and_survives_sigterm(teacher_run):
    lines = [json.loads(x) for x in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # the resumed run continued the log
    assert all(math.isfinite(x["grad_norm"]) and x["grad_norm"] > 0 for x in lines)  # measured without ZeRO
    curve = [x["loss"] for x in lines]
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.2, curve
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(teacher_run / "export")
    assert model.config.num_hidden_layers == 4
    latest = (teacher_run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000040" and (teacher_run / "checkpoints" / latest / "COMPLETE").is_file()


def test_two_process_zero2_distillation_loss_falls(student_run):
    lines = [json.loads(x) for x in (student_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(2, 17, 2))
    for key in ("loss", "loss_kl", "loss_mlm", "loss_cos", "lr", "grad_norm", "loss_scale", "tokens_per_s",
                "sequences_per_s", "masked_tokens", "tflops_per_s"):
        assert key in lines[-1], key
    curve = [x["loss"] for x in lines]
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve
    ds = json.loads((student_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8 * 2 * 2
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and ds["gradient_clipping"] == 5.0
    # keep=2: only the last two complete checkpoints remain
    tags = sorted(p.name for p in (student_run / "checkpoints").glob("step_*"))
    assert tags == ["step_00000012", "step_00000016"]


def test_export_round_trip_fill_mask(student_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    export = student_run / "export"
    assert (export / "model.safetensors").is_file()
    model = AutoModelForMaskedLM.from_pretrained(export)
    assert type(model).__name__ == "DistilBertForMaskedLM" and model.config.n_layers == 2
    tok = AutoTokenizer.from_pretrained(export)
    fill = pipeline("fill-mask", model=model, tokenizer=tok)
    preds = fill(f"the cat {tok.mask_token} over the tree.")
    assert len(preds) == 5 and all(p["token_str"] for p in preds)


def test_resume_gives_bitwise_equal_weights(shards, teacher_run, student_run, tmp_path):
    out = tmp_path / "resumed"
    distill(shards, teacher_run, out, "run.stop_after_steps=6", status=3)  # "preempted" after 6 steps
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not (out / "export").exists()
    distill(shards, teacher_run, out, "run.stop_after_steps=null")
    a = load_file(student_run / "export" / "model.safetensors")
    b = load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run's log continues where the first stopped
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(2, 17, 2))


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(shards, tmp_path):
    """lr=1e30 blows the weights up after one update; the following losses are NaN, their updates are
    skipped, and after run.max_nonfinite_steps of them the run stops with one error line."""
    out = tmp_path / "nan"
    p = subprocess.run([sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
                        f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=20", "optim.lr=1e30",
                        "checkpoint.every=1", "run.max_nonfinite_steps=3"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NaN/inf for 3 optimizer step(s) in a row" in errors[0], p.stderr[-3000:]
    failed_at = int(re.search(r"at step (\d+)", errors[0]).group(1))
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{failed_at - 3:08d}", (latest, errors[0])  # the last step before the streak
    assert max(x.name for x in (out / "checkpoints").glob("step_*")) == latest
    assert not (out / "export").exists()


def test_missing_teacher_is_one_error_before_training(shards, tmp_path):
    p = subprocess.run([str(BIN / "distil"), "train", "--config", "configs/tiny_cpu.yaml", f"data.shards={shards}",
                        f"teacher.path={tmp_path / 'no_teacher'}", f"run.output_dir={tmp_path / 'r'}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "teacher" in errors[0], p.stderr[-2000:]
    assert not (tmp_path / "r" / "checkpoints").exists()
