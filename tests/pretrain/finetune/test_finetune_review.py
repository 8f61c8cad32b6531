"""`distil review`'s GLUE view over fine-tuning runs written straight into a temp MLflow store: Table 1 (scores,
macro, student as % of its teacher), Table 3 (parameters, inference time, ratios) and the plot."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

mlflow = pytest.importorskip("mlflow")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from distil.pretrain.cli import main  # noqa: E402


def _run(client, experiment_id: str, name: str, params: dict[str, str], metrics: dict[str, float],
         tags: dict[str, str] | None = None, status: str = "FINISHED") -> str:
    run = client.create_run(experiment_id, run_name=name)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _finetune(client, experiment_id, model: str, name: str, task: str, score: float, params: int,
              seconds: float | None = None, teacher: str = "", threads: str = "1", status: str = "FINISHED") -> str:
    metrics = {"dev_score": score, "dev_accuracy": score, "num_parameters": params}
    tags = {}
    if seconds is not None:
        metrics.update(inference_seconds=seconds, inference_examples=1500, inference_batch_size=1)
        tags = {"distil.finetune.inference_device": "cpu", "distil.finetune.torch_threads": threads}
    return _run(client, experiment_id, f"finetune-{name}-{task}",
                {"mode": "finetune", "finetune.model": model, "finetune.name": name, "finetune.task": task,
                 "finetune.teacher": teacher, "finetune.seeds": "5"}, metrics, tags, status)


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    experiment_id = client.create_experiment("glue", artifact_location=(tmp_path / "art").as_uri())
    runs = tmp_path / "runs"
    # distil's training runs: an MLM teacher and a student distilled from it (the student's teacher is found
    # through them); a second student names its teacher with --teacher.
    _run(client, experiment_id, "teacher-mlm", {"mode": "mlm", "run.output_dir": str(runs / "teacher")}, {"loss": 2.0})
    _run(client, experiment_id, "student-distil", {"mode": "distill", "run.output_dir": str(runs / "student"),
                                                   "teacher.path": str(runs / "teacher" / "export")}, {"loss": 3.0})
    teacher, student = str(runs / "teacher" / "export"), str(runs / "student" / "export")
    other = str(tmp_path / "other-student")
    _finetune(client, experiment_id, teacher, "teacher", "sst2", 0.90, 110_000_000, seconds=668.0)
    _finetune(client, experiment_id, teacher, "teacher", "stsb", 0.80, 110_000_000, seconds=668.0)
    _finetune(client, experiment_id, teacher, "teacher", "cola", 0.50, 110_000_000)
    _finetune(client, experiment_id, student, "student", "sst2", 0.10, 66_000_000)  # replaced by the next one
    _finetune(client, experiment_id, student, "student", "sst2", 0.81, 66_000_000, seconds=410.0)
    _finetune(client, experiment_id, student, "student", "stsb", 0.76, 66_000_000, seconds=410.0)
    _finetune(client, experiment_id, student, "student", "cola", 0.99, 66_000_000, status="FAILED")  # not shown
    _finetune(client, experiment_id, other, "other", "stsb", 0.40, 30_000_000, seconds=100.0, teacher=teacher,
              threads="2")
    seed_params = {"mode": "finetune-seed", "finetune.model": student, "finetune.task": "sst2", "finetune.seed": "42"}
    _run(client, experiment_id, "finetune-student-sst2-seed42", seed_params, {"dev_score": 0.2})
    return uri, tmp_path


def test_glue_view_shows_scores_percent_of_teacher_and_inference_ratios(store):
    uri, root = store
    result = CliRunner().invoke(main, ["review", "--experiment", "glue", "--tracking-uri", uri, "--output",
                                       str(root / "cmp.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    everything = result.output.splitlines()
    lines = everything[next(i for i, line in enumerate(everything) if "GLUE-style" in line):]  # the GLUE view

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.replace("┃", "│").strip().strip("│").split("│")]

    def row(start: str) -> list[str]:
        found = [line for line in lines if line.strip("│┃ ").startswith(start)]
        assert found, (start, result.output)
        return cells(found[0])

    header = row("model")
    assert header[:4] == ["model", "role", "params", "macro"] and header[4:] == ["cola", "sst2", "stsb"]
    teacher = row("teacher ")
    assert teacher[1:] == ["teacher", "110M", "73.3", "50.0", "90.0", "80.0"]  # macro (50+90+80)/3
    student = row("student ")
    assert student[1:] == ["student", "66M", "78.5", "-", "81.0", "76.0"]  # latest sst2 run; failed cola left out
    pct = [line for line in lines if "% of teacher" in line]
    # macro over the shared tasks: (81 + 76) / (90 + 80) = 92.35 %; per task 90.0 % and 95.0 %
    assert cells(pct[0])[3:] == ["92.4%", "-", "90.0%", "95.0%"]
    assert lines.index(next(line for line in lines if line.strip("│ ").startswith("teacher "))) < lines.index(pct[0])
    other = row("other ")
    assert other[1] == "student"  # its --teacher names the teacher row
    # Table 3 on STS-B (every timed model has it): the student's params 60 %, time 61 %, 1.63x faster; the
    # other student was timed with 2 threads: no ratio against the teacher's 1-thread figure.
    table3 = [line for line in lines if "inference time" in line]
    assert table3 and "stsb" in table3[0]
    t3 = [line for line in lines[lines.index(table3[0]):] if line.strip("│ ").startswith("student ")][0]
    assert cells(t3)[3:] == ["60%", "1500", "cpu", "1", "1", "410.00", "61%",
                                                                  "1.63x"]
    t3_other = [line for line in lines[lines.index(table3[0]):] if line.strip("│ ").startswith("other ")][0]
    assert cells(t3_other)[-2:] == ["-", "-"]
    # the training runs still get their own comparison; the seed run is not a training row
    assert "teacher-mlm" in result.output and "student-distil" in result.output
    assert "seed42" not in result.output
    assert (root / "cmp.png").is_file() and (root / "cmp_glue.png").read_bytes()[:4] == b"\x89PNG"


def test_glue_view_is_absent_without_fine_tuning_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    experiment_id = client.create_experiment("plain", artifact_location=(tmp_path / "art").as_uri())
    _run(client, experiment_id, "teacher-mlm", {"mode": "mlm", "run.output_dir": str(tmp_path / "t")}, {"loss": 2.0})
    result = CliRunner().invoke(main, ["review", "--experiment", "plain", "--tracking-uri", uri, "--output",
                                       str(tmp_path / "cmp.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "GLUE" not in result.output and not (tmp_path / "cmp_glue.png").exists()
