"""Narrower students end to end on CPU through the DeepSpeed launcher (2 processes, ZeRO-2): a 4 x 64 BERT
teacher (MLM mode) distilled into 2 x 32 students with each layer loss turned on alone (the relations one started
from the teacher's slice, student.narrow_init=subclone); the loss falls; the projections live in the checkpoints
and not in the export; a run killed with SIGKILL resumes to bitwise the weights of an uninterrupted one; the
export loads in transformers and fine-tunes with `distil finetune`."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_helpers import BIN, REPO, WORDS, env, free_port, make_shards, run, sigkill_after_checkpoint
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 12
NARROW = ["student.hidden_size=32", "student.num_attention_heads=2", "student.intermediate_size=64",
          "loss.alpha_ce=0", "loss.alpha_mlm=0", "loss.alpha_cos=0", "student.dropout=0",
          "student.attention_dropout=0"]
LOSSES = {
    "hidden": ["loss.alpha_hidden=1", "loss.hidden_layers=[2,4]", "loss.hidden_embeddings=true"],
    # started from the teacher's slice (the teacher's heads are 16 wide, as the student's)
    "relations": ["loss.alpha_relations=1", "loss.relation_heads=4", "loss.relation_layer=3",
                  "student.narrow_init=subclone"],
    "attention": ["loss.alpha_attention=1", "loss.hidden_layers=[2,4]", "student.num_attention_heads=4"],
}
PART = {"hidden": "loss_hidden", "relations": "loss_relations", "attention": "loss_attention"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    shards = make_shards(root)
    teacher = root / "teacher"
    run([str(BIN / "distil"), "train", "--config", "configs/tiny_mlm_cpu.yaml", f"data.shards={shards}",
         f"run.output_dir={teacher}", "run.max_steps=20", "checkpoint.every=0"], timeout=420)
    return {"shards": shards, "teacher": teacher / "export"}


def args(data: dict[str, Path], out: Path, loss: str) -> list[str]:
    return ["configs/tiny_cpu.yaml", f"data.shards={data['shards']}", f"teacher.path={data['teacher']}",
            f"run.output_dir={out}", f"run.max_steps={STEPS}", "run.log_every=2", "checkpoint.every=4",
            "checkpoint.keep=3", "optim.lr=3e-3", *NARROW, *LOSSES[loss]]


def launch(cmd_args: list[str], **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    e = env()
    e.update(NUM_GPUS="2", MASTER_PORT=str(free_port()))
    if popen:
        return subprocess.Popen(["bash", "launch/local.sh", *cmd_args], cwd=REPO, env=e, **popen)
    p = subprocess.run(["bash", "launch/local.sh", *cmd_args], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.fixture(scope="module")
def hidden_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hidden")
    launch(args(data, out, "hidden"))
    return out


def curve(out: Path, part: str) -> list[float]:
    return [json.loads(line)[part] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["relations", "attention"])
def test_each_layer_loss_alone_lowers_a_narrower_students_loss(loss, data, tmp_path):
    p = launch(args(data, tmp_path, loss))
    if loss == "relations":
        assert "(student.narrow_init=subclone)" in p.stdout + p.stderr, p.stderr[-3000:]
    values = curve(tmp_path, PART[loss])
    assert len(values) == STEPS // 2 and values[-1] < values[0], values


def test_projected_hidden_states_train_checkpoint_and_stay_out_of_the_export(hidden_run):
    values = curve(hidden_run, "loss_hidden")
    assert values[-1] < values[0], values
    exported = load_file(hidden_run / "export" / "model.safetensors")
    assert not [k for k in exported if "projection" in k or k.startswith("plan.")]
    assert exported["distilbert.embeddings.word_embeddings.weight"].shape[1] == 32
    state = torch.load(next((hidden_run / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")),
                       map_location="cpu", weights_only=False)
    names = [k for k in state["module"] if k.startswith("plan.projections.")]
    assert sorted(names) == [f"plan.projections.{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    assert state["module"]["plan.projections.0.weight"].shape == (64, 32)  # student 32 -> teacher 64


def test_a_narrow_run_killed_with_sigkill_resumes_to_the_same_weights(data, hidden_run, tmp_path):
    """The projections are trained state: were they not restored, the resumed student would differ."""
    out = tmp_path / "killed"
    proc = launch(args(data, out, "hidden"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                  start_new_session=True)
    assert sigkill_after_checkpoint(proc, out, 4) < f"step_{STEPS:08d}" and not (out / "export").exists()
    launch(args(data, out, "hidden"))
    a, b = load_file(hidden_run / "export" / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_narrow_student_loads_in_transformers_and_fine_tunes(hidden_run, tmp_path):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(hidden_run / "export")
    assert (model.config.dim, model.config.n_heads, model.config.hidden_dim, model.config.n_layers) == (32, 2, 64, 2)
    rng = random.Random(1)
    for split, n in (("train", 48), ("dev", 24)):
        rows = [(" ".join(rng.choice(WORDS) for _ in range(8)), rng.randint(0, 1)) for _ in range(n)]
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    run([str(BIN / "distil"), "finetune", "--model", str(hidden_run / "export"), "--task", "custom", "--train",
         str(tmp_path / "train.csv"), "--dev", str(tmp_path / "dev.csv"), "--output", str(tmp_path / "ft"),
         "--epochs", "1", "--seeds", "1", "--batch-size", "16", "--max-seq-len", "32", "--no-tracking",
         "inference_max_examples=5"])
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["model_type"] == "distilbert" and 0 <= report["median"]["dev_score"] <= 1
