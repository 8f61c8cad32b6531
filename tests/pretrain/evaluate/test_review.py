"""`distil review` over a local MLflow store, and the loss-curve plots."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

mlflow = pytest.importorskip("mlflow")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from distil.pretrain.cli import main  # noqa: E402
from distil.pretrain.metrics.plots import read_metrics_jsonl, write_loss_curves  # noqa: E402


def _log_run(client, experiment_id: str, name: str, mode: str, params: int, losses: list[float],
             tokens_per_s: float, eval_ppl: float | None) -> str:
    run = client.create_run(experiment_id, run_name=name)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for step, loss in enumerate(losses, start=1):
        metrics += [Metric("loss", loss, now + step, step), Metric("loss_mlm", loss / 2, now + step, step),
                    Metric("loss_scale", 65536.0, now + step, step),
                    Metric("tokens_per_s", tokens_per_s, now + step, step),
                    Metric("system/node_0/cpu_utilization_percentage", 50.0, now + step, step)]
    if eval_ppl is not None:
        metrics.append(Metric("eval/perplexity", eval_ppl, now, len(losses)))
    params_logged = [Param("mode", mode)] + ([Param("teacher.path", "/data/runs/bert-teacher/export")]
                                             if mode == "distill" else [])
    client.log_batch(run_id, metrics=metrics, params=params_logged,
                     tags=[RunTag("distil.num_parameters", str(params))])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    experiment_id = client.create_experiment("review-test", artifact_location=(root / "art").as_uri())
    ids = {
        "teacher": _log_run(client, experiment_id, "teacher-mlm", "mlm", 4_400_000, [9.0, 6.0, 4.0], 900.0, 12.5),
        "student-a": _log_run(client, experiment_id, "student-a", "distill", 2_100_000, [8.0, 5.0, 3.25],
                              1800.0, 15.0),
        "student-b": _log_run(client, experiment_id, "student-b", "distill", 2_100_000, [8.0, 7.0, 6.5],
                              1750.0, None),
    }
    return uri, ids


def _review(*args: str):
    return CliRunner().invoke(main, ["review", *args], catch_exceptions=False)


def test_review_compares_teacher_and_students_and_writes_a_plot(store, tmp_path):
    uri, ids = store
    out = tmp_path / "cmp.png"
    result = _review("--experiment", "review-test", "--tracking-uri", uri, "--output", str(out))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {name: next(line for line in lines if name in line) for name in ("teacher-mlm", "student-a", "student-b")}
    assert "teacher" in rows["teacher-mlm"] and "4.4M" in rows["teacher-mlm"] and "12.5" in rows["teacher-mlm"]
    assert "student" in rows["student-a"] and "2.1M" in rows["student-a"] and "3.25" in rows["student-a"]
    assert "1,800" in rows["student-a"] and "6.5" in rows["student-b"]
    assert "bert-teacher/export" in rows["student-a"] and "bert-teacher" not in rows["teacher-mlm"]
    assert "loss_mlm" in result.output and "eval/perplexity" in result.output
    assert "cpu_utilization" not in result.output  # system metrics are not training figures
    assert "loss_scale" not in result.output  # not a loss
    assert lines.index(rows["teacher-mlm"]) < lines.index(rows["student-a"]) < lines.index(rows["student-b"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_review_selects_runs_by_id_prefix_and_by_filter(store, tmp_path):
    uri, ids = store
    result = _review("--experiment", "review-test", "--tracking-uri", uri, "--runs", ids["student-b"][:10],
                     "--output", str(tmp_path / "one.png"))
    assert result.exit_code == 0, result.output
    assert "student-b" in result.output and "student-a" not in result.output and "teacher-mlm" not in result.output
    result = _review("--experiment", "review-test", "--tracking-uri", uri, "--filter", "params.mode = 'distill'",
                     "--output", str(tmp_path / "students.png"))
    assert result.exit_code == 0, result.output
    assert "student-a" in result.output and "student-b" in result.output and "teacher-mlm" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "no experiment named 'nope'"),
    (["--experiment", "review-test", "--runs", "ffffffff"], "no run ffffffff"),
    (["--experiment", "review-test", "--filter", "params.mode ==== 'x'"], "bad --filter"),
])
def test_review_user_errors_are_one_line(store, tmp_path, args, message):
    uri, _ = store
    result = CliRunner().invoke(main, ["review", "--tracking-uri", uri, "--output", str(tmp_path / "x.png"), *args])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_review_of_a_missing_store_says_where_to_point_it(tmp_path):
    result = CliRunner().invoke(main, ["review", "--experiment", "x", "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 2 and "no MLflow store at" in result.output
    assert not (tmp_path / "none.db").exists()  # review never creates an empty store


def test_loss_curves_from_metrics_jsonl(tmp_path):
    lines = [json.dumps({"step": s, "loss": 10.0 / s, "loss_ce": 5.0 / s, "lr": 1e-4 * s, "note": "x"})
             for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "loss": 1.')  # torn last line
    series = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert series["loss"] == ([1, 2, 3, 4, 5], [10.0, 5.0, 10.0 / 3, 2.5, 2.0]) and "note" not in series
    png = write_loss_curves(tmp_path)
    assert png == tmp_path / "plots" / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_loss_curves(tmp_path / "empty-run") is None


def test_review_of_an_unreachable_server_is_one_error_line(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(main, ["review", "--experiment", "x", "--tracking-uri", f"http://127.0.0.1:{port}",
                                       "--output", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: cannot read the tracking store")
    assert len(result.output.strip().splitlines()) == 1
