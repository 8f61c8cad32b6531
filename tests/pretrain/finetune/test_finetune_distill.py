"""`distil finetune --distill-from`: the paper's second step, a teacher fine-tuned on the task teaching the model
being fine-tuned. The loss against its formula in fp64 (and its gradients in fp16 under a loss scale, row by
row); a student that sees no labels at all (alpha_task=0) learning the task from the teacher's logits alone;
the report, the MLflow runs and review's "(D)" row; one-line errors that write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from finetune_helpers import assert_one_error_line, make_models, rows_for, write_custom, write_glue

from distil.pretrain.cli import main
from distil.pretrain.finetune.distill import task_distillation_loss

FAST = ["--seeds", "1", "--batch-size", "8", "--max-seq-len", "32", "--lr", "3e-3"]


def invoke(args: list[str]):
    return CliRunner().invoke(main, ["finetune", *args], catch_exceptions=False)


def sst2_files(root: Path) -> list[str]:
    return ["--task", "sst2", "--train", str(write_glue("sst2", root / "sst2" / "train.tsv", rows_for("sst2", 64, 1))),
            "--dev", str(write_glue("sst2", root / "sst2" / "dev.tsv", rows_for("sst2", 40, 2)))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """The tiny models, and the BERT one fine-tuned on SST-2's rule (saved, tracked): the task teacher."""
    root = tmp_path_factory.mktemp("distill")
    models = make_models(root / "models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "teacher-sst2"
    result = invoke(["--model", models["teacher"], *sst2_files(root), "--output", str(out), *FAST, "--epochs", "10",
                     "--tracking-uri", uri, "--experiment", "ft", "save_models=true", "inference=false"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"][0]["dev"]["dev_accuracy"] > 0.75, report["seeds"][0]["history"]
    return {**models, "root": str(root), "uri": uri, "task_teacher": str(out / "seed_42" / "model"),
            "teacher_child_run": report["seeds"][0]["mlflow_run_id"]}


# -- the loss ----------------------------------------------------------------------------------------------


def _reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha_kd: float, alpha_task: float,
               t: float) -> torch.Tensor:
    """Per-row loss in fp64 from the definitions: sum_c p_t (log p_t - log p_s) at T, times T^2; -log p_s[y]."""
    s, te = student.double(), teacher.double()
    p_t = torch.exp(te / t) / torch.exp(te / t).sum(-1, keepdim=True)
    p_s = torch.exp(s / t) / torch.exp(s / t).sum(-1, keepdim=True)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1) * t * t
    ce = -torch.log(torch.exp(s) / torch.exp(s).sum(-1, keepdim=True))[torch.arange(len(s)), labels]
    return alpha_kd * kl + alpha_task * ce


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_the_classification_loss_is_its_formula_in_fp64(t):
    torch.manual_seed(0)
    student, teacher = torch.randn(9, 3, dtype=torch.float64) * 3, torch.randn(9, 3, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (9,))
    total, soft, task = task_distillation_loss(student, teacher, labels, False, 0.7, 0.3, t)
    assert total.item() == pytest.approx(_reference(student, teacher, labels, 0.7, 0.3, t).mean().item(), rel=1e-6)
    assert soft.item() == pytest.approx(_reference(student, teacher, labels, 1, 0, t).mean().item(), rel=1e-6)
    assert task.item() == pytest.approx(_reference(student, teacher, labels, 0, 1, t).mean().item(), rel=1e-6)
    same, _, _ = task_distillation_loss(teacher, teacher, labels, False, 1.0, 0.0, t)
    assert abs(same.item()) < 1e-6  # the soft term vanishes when the student agrees with the teacher


def test_the_regression_loss_is_mse_to_the_teacher_and_to_the_labels():
    student, teacher, labels = torch.tensor([[1.0], [2.0], [0.5]]), torch.tensor([[1.5], [1.0], [0.5]]), \
        torch.tensor([1.0, 3.0, 0.0])
    total, soft, task = task_distillation_loss(student, teacher, labels, True, 0.25, 0.75, 2.0)
    assert soft.item() == pytest.approx((0.25 + 1.0 + 0.0) / 3)  # no T^2 on a regression: MSE to the prediction
    assert task.item() == pytest.approx((0.0 + 1.0 + 0.25) / 3)
    assert total.item() == pytest.approx(0.25 * soft.item() + 0.75 * task.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_logits_give_the_fp64_gradients_row_by_row_under_the_loss_scale(dtype):
    """Under autocast the logits arrive in fp16 / bf16: the loss is computed in fp32, and the gradient that
    reaches each row of logits, scaled by fp16's loss scale, is the fp64 one to the dtype's precision."""
    torch.manual_seed(1)
    n, scale, t = 32, 2.0**16, 2.0
    student64, teacher64 = torch.randn(n, 2, dtype=torch.float64) * 4, torch.randn(n, 2, dtype=torch.float64) * 4
    labels = torch.randint(0, 2, (n,))
    student = student64.to(dtype).requires_grad_()
    total, _, _ = task_distillation_loss(student, teacher64.to(dtype), labels, False, 0.5, 0.5, t)
    (total * scale).backward()
    reference = student.detach().double().requires_grad_()
    (_reference(reference, teacher64.to(dtype).double(), labels, 0.5, 0.5, t).mean() * scale).backward()
    got, want = student.grad.double(), reference.grad
    assert torch.isfinite(got).all()
    eps = torch.finfo(dtype).eps
    for row in range(n):  # each example's gradient on its own: a norm over the batch could hide one bad row
        assert torch.allclose(got[row], want[row], rtol=4 * eps, atol=4 * eps * want.abs().max().item()), \
            (row, got[row], want[row])


# -- end to end ----------------------------------------------------------------------------------------------


def test_a_student_without_labels_learns_the_task_from_the_teacher_and_review_shows_its_d_row(trained, tmp_path):
    root, uri = Path(trained["root"]), trained["uri"]
    files = sst2_files(tmp_path)
    plain = tmp_path / "plain"
    result = invoke(["--model", trained["student"], *files, "--output", str(plain), *FAST, "--epochs", "1",
                     "--tracking-uri", uri, "--experiment", "ft", "--teacher", trained["teacher"], "inference=false"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "distilled"
    result = invoke(["--model", trained["student"], *files, "--output", str(out), *FAST, "--epochs", "6",
                     "--tracking-uri", uri, "--experiment", "ft", "--teacher", trained["teacher"],
                     "--distill-from", trained["task_teacher"], "alpha_task=0", "alpha_kd=1", "temperature=1",
                     "save_models=true", "inference=false"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    d = report["distillation"]
    assert d["teacher"] == str(Path(trained["task_teacher"]).resolve()) and d["teacher_precision"] == "fp32"
    assert (d["alpha_kd"], d["alpha_task"], d["temperature"]) == (1.0, 0.0, 1.0)
    assert d["teacher_run_id"] == trained["teacher_child_run"] and d["teacher_dev"]["dev_accuracy"] > 0.75
    assert report["name"] == "student (D)"
    # no label reached the loss (alpha_task=0): what it learned came from the teacher's logits. Checked to fail
    # with the teacher's logits shuffled within each batch (the student then stays at the majority class, 0.6).
    dev_labels = [y for _, _, y in rows_for("sst2", 40, 2)]
    majority = max(dev_labels.count(y) for y in set(dev_labels)) / len(dev_labels)
    assert report["median"]["dev_accuracy"] >= majority + 0.15, (majority, report["seeds"][0]["history"])
    saved = json.loads((out / "seed_42" / "model" / "distil_task.json").read_text())
    assert saved["distilled_from"] == d["teacher"]

    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.params["finetune.distill_from"] == d["teacher"]
    assert parent.data.params["finetune.alpha_task"] == "0.0" and parent.data.params["finetune.temperature"] == "1.0"
    assert parent.data.tags["distil.finetune.teacher_run_id"] == trained["teacher_child_run"]
    plain_parent = client.get_run(json.loads((plain / "report.json").read_text())["mlflow"]["parent_run_id"])
    assert "finetune.distill_from" not in plain_parent.data.params and "finetune.alpha_kd" not in plain_parent.data.params

    review = CliRunner().invoke(main, ["review", "--experiment", "ft", "--tracking-uri", uri,
                                       "--output", str(tmp_path / "cmp.png")], catch_exceptions=False)
    assert review.exit_code == 0, review.output
    rows = [line.strip("│ ") for line in review.output.splitlines()]
    d_row = next(r for r in rows if r.startswith("student (D)"))
    plain_row = next(r for r in rows if r.startswith("student ") and not r.startswith("student (D)"))
    assert f"{100 * report['median']['dev_score']:.1f}" in d_row
    assert f"{100 * json.loads((plain / 'report.json').read_text())['median']['dev_score']:.1f}" in plain_row
    assert root.is_dir()


def test_regression_is_distilled_through_the_teachers_prediction(trained, tmp_path):
    files = ["--task", "stsb", "--train", str(write_glue("stsb", tmp_path / "train.tsv", rows_for("stsb", 32, 1))),
             "--dev", str(write_glue("stsb", tmp_path / "dev.tsv", rows_for("stsb", 16, 2)))]
    teacher = tmp_path / "teacher"
    assert invoke(["--model", trained["teacher"], *files, "--output", str(teacher), *FAST, "--epochs", "1",
                   "--no-tracking", "save_models=true", "inference=false"]).exit_code == 0
    out = tmp_path / "student"
    result = invoke(["--model", trained["student"], *files, "--output", str(out), *FAST, "--epochs", "1",
                     "--no-tracking", "--distill-from", str(teacher / "seed_42" / "model"), "inference=false"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["problem"] == "regression" and report["distillation"]["alpha_kd"] == 0.5
    assert "dev_pearson" in report["median"]


# -- errors ------------------------------------------------------------------------------------------------


def _relabelled(trained: dict, root: Path, **changes) -> str:
    folder = root / "relabelled"
    shutil.copytree(trained["task_teacher"], folder)
    info = json.loads((folder / "distil_task.json").read_text())
    (folder / "distil_task.json").write_text(json.dumps({**info, **changes}))
    return str(folder)


ERRORS = {
    "no such folder": (lambda t, r: str(r / "nope"), [], ["no such folder", "save_models=true"]),
    "a pretrained encoder": (lambda t, r: t["teacher"], [], ["no distil_task.json", "save_models=true"]),
    "another task": (lambda t, r: _relabelled(t, r, task="cola"), [], ["fine-tuned on cola, not sst2"]),
    "other labels": (lambda t, r: _relabelled(t, r, labels=["neg", "pos"]), [],
                     ["labels (neg, pos)", "this task has (0, 1)"]),
    "pairs": (lambda t, r: _relabelled(t, r, has_pair=True), [], ["pairs", "single texts"]),
    "both weights zero": (lambda t, r: t["task_teacher"], ["alpha_kd=0", "alpha_task=0"], ["alpha_kd and alpha_task"]),
    "bad temperature": (lambda t, r: t["task_teacher"], ["temperature=0"], ["temperature=0"]),
    "the model itself": (lambda t, r: t["student"], [], ["is the model being fine-tuned"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_wrong_task_teacher_is_one_error_line_and_writes_nothing(case, trained, tmp_path):
    make_teacher, extra, needles = ERRORS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = sst2_files(inputs)
    model = trained["student"]
    teacher = make_teacher(trained, inputs)
    out = tmp_path / "out"
    result = invoke(["--model", model, *files, "--output", str(out), *FAST, "--epochs", "1", "--distill-from", teacher,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra])
    assert_one_error_line(result, *needles)
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_custom_task_teacher_with_another_label_set_is_refused(trained, tmp_path):
    rows = [("a good film", None, "pos"), ("a bad film", None, "neg")] * 8
    files = ["--task", "custom", "--train", str(write_custom(tmp_path / "t.jsonl", rows)),
             "--dev", str(write_custom(tmp_path / "d.jsonl", rows[:4]))]
    teacher = tmp_path / "teacher"
    assert invoke(["--model", trained["teacher"], *files, "--output", str(teacher), *FAST, "--epochs", "1",
                   "--no-tracking", "save_models=true", "inference=false"]).exit_code == 0
    other = [("a good film", None, "yes"), ("a bad film", None, "no")] * 8
    result = invoke(["--model", trained["student"], "--task", "custom", "--train", str(write_custom(
        tmp_path / "t2.jsonl", other)), "--dev", str(write_custom(tmp_path / "d2.jsonl", other[:4])), "--output",
        str(tmp_path / "out"), *FAST, "--no-tracking", "--distill-from", str(teacher / "seed_42" / "model")])
    assert result.exit_code == 2 and "labels (neg, pos) but this task has (no, yes)" in result.stderr, result.output
    assert not (tmp_path / "out").exists()
