"""End to end: `distil train` runs tracked by a real `mlflow server` on 127.0.0.1.

An MLM teacher (one process), then a 2-process ZeRO-2 distillation through the deepspeed launcher that is
"preempted" after 6 steps (run KILLED) and resumed with `--resume auto`; during the resumed part the server
is killed and restarted. Checked through MlflowClient: params, metrics of every step in one run, system
metrics, artifacts, the registered student, the final status; then `distil review` over the experiment.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_helpers import BIN, REPO, env, free_port, make_shards, run
from mlflow_test_server import MlflowServer, running_server

from distil.pretrain.checkpoint.files import resolve_resume

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

EXPERIMENT = "e2e"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


def tracking_overrides(server: MlflowServer, name: str, model: str) -> list[str]:
    return ["tracking.enabled=true", f"tracking.tracking_uri={server.uri}", f"tracking.experiment={EXPERIMENT}",
            f"tracking.run_name={name}", f"tracking.registered_model_name={model}",
            "tracking.system_metrics_interval_s=1", "tracking.retry_interval_s=1"]


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("e2e-mlflow"))


@pytest.fixture(scope="module")
def teacher(shards, server, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("tracked-teacher")
    run([sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml", f"data.shards={shards}",
         f"run.output_dir={out}", "run.max_steps=20", "run.log_every=5", "checkpoint.every=20",
         *tracking_overrides(server, "teacher", "e2e-teacher")])
    return out


def distill_command(shards: Path, teacher: Path, out: Path, server: MlflowServer, *extra: str) -> list[str]:  # noqa: F811
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
            "distil.pretrain.train", "--config", "configs/tiny_cpu.yaml", f"data.shards={shards}",
            f"teacher.path={teacher / 'export'}", f"run.output_dir={out}", "run.max_steps=16", "run.log_every=2",
            "checkpoint.every=2", "checkpoint.keep=2", *tracking_overrides(server, "student", "e2e-student"),
            *extra]


def test_tracked_distillation_preempted_resumed_and_outage(shards, teacher, server, tmp_path):  # noqa: F811
    out = tmp_path / "student"
    client = server.client()

    # 1. preempted after 6 steps: the run ends KILLED (exit 3: more to do) and its id is in the checkpoint
    stopped = subprocess.run(distill_command(shards, teacher, out, server, "run.stop_after_steps=6"), cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=400)
    assert stopped.returncode == 3, stopped.stdout[-3000:] + stopped.stderr[-5000:]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    students = client.search_runs([experiment.experiment_id], "attributes.run_name = 'student'")
    assert len(students) == 1  # rank 1 created no run of its own
    run_id = students[0].info.run_id
    assert students[0].info.status == "KILLED"

    # 2. resumed; the server dies after the first new metrics line and comes back a few lines later
    done_before = len(metric_lines(out))
    job = subprocess.Popen(distill_command(shards, teacher, out, server) + ["--resume", "auto"], cwd=REPO,
                           env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 400
        while len(metric_lines(out)) <= done_before and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        server.kill()
        killed_at = len(metric_lines(out))
        while len(metric_lines(out)) < killed_at + 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        server.start()
        output, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-5000:]
    assert output.count("is unreachable") == 1, output[-5000:]
    try:
        check_tracked_runs(client, run_id, out, server, tmp_path)
    except Exception as error:  # the server's side of the story, for a failure that involves it
        log = server.log_path.read_text()[-4000:] if server.log_path.exists() else ""
        raise AssertionError(f"{error}\n--- mlflow server log (tail) ---\n{log}") from error


def check_tracked_runs(client, run_id: str, out: Path, server: MlflowServer, tmp_path: Path) -> None:
    steps = [line["step"] for line in metric_lines(out)]
    assert steps == list(range(2, 17, 2))
    data = client.get_run(run_id)
    assert data.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == steps  # one run, every step
    for key in ("loss_kl", "loss_mlm", "loss_cos", "lr", "grad_norm", "loss_scale", "tokens_per_s"):
        assert key in data.data.metrics, key
    assert any(k.startswith("system/node_0/") for k in data.data.metrics)
    assert data.data.params["mode"] == "distill" and data.data.params["derived.world_size"] == "2"
    assert data.data.tags["distil.world_size"] == "2" and data.data.tags["distil.resumed"] == "true"
    artifacts = {a.path for a in client.list_artifacts(run_id, "run")}
    assert {"run/config.yaml", "run/ds_config.json", "run/manifest.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss_curves.png"]
    versions = client.search_model_versions(f"name='e2e-student' and run_id='{run_id}'")
    assert len(versions) == 1

    # the teacher's run, then both compared
    experiment = client.get_experiment_by_name(EXPERIMENT)
    teacher_run = client.search_runs([experiment.experiment_id], "attributes.run_name = 'teacher'")[0]
    assert teacher_run.info.status == "FINISHED"
    assert client.search_model_versions(f"name='e2e-teacher' and run_id='{teacher_run.info.run_id}'")
    review = run([str(BIN / "distil"), "review", "--experiment", EXPERIMENT, "--tracking-uri", server.uri,
                  "--output", str(tmp_path / "cmp.png")])
    assert "teacher" in review.stdout and "student" in review.stdout
    assert (tmp_path / "cmp.png").is_file()
    assert f"{server.uri}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning" in review.stdout

    # lineage: both trained on the same shard set (one dataset input, also after the resume); the student's
    # teacher is the model the teacher's run logged
    from distil.data_pipeline.manifest import Manifest
    from distil.pretrain.tracking.lineage import manifest_digest

    digest = manifest_digest(Manifest.from_dict(json.loads((out / "manifest.json").read_text())))
    teacher_data = client.get_run(teacher_run.info.run_id)
    for tracked in (data, teacher_data):
        assert [(d.dataset.name, d.dataset.digest) for d in tracked.inputs.dataset_inputs] == [("shards", digest)]
        assert tracked.data.tags["mlflow.source.name"] == "distil train"
    teacher_model = teacher_data.data.tags["distil.student_model_uri"].split("/")[-1]
    assert [m.model_id for m in data.inputs.model_inputs] == [teacher_model]
    assert client.get_logged_model(teacher_model).experiment_id == experiment.experiment_id


def test_a_run_killed_and_resumed_logs_each_step_once(shards, server, tmp_path):  # noqa: F811
    """SIGKILL once MLflow holds steps past the last checkpoint: the resumed run trains those steps again, and
    the run's history keeps each step once, with the values metrics.jsonl holds (the resume is exact)."""
    out = tmp_path / "crashed"
    client = server.client()
    cmd = [sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
           f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=60", "run.log_every=1",
           "checkpoint.every=20", "run.export=false", *tracking_overrides(server, "crashed", "null")]

    def logged_steps(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "loss"))

    job = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        experiment, run_id, deadline = None, None, time.monotonic() + 300
        while True:
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            experiment = experiment or client.get_experiment_by_name(EXPERIMENT)
            runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'crashed'") if experiment else []
            if runs:
                run_id = runs[0].info.run_id
                job.send_signal(signal.SIGSTOP)  # frozen: its checkpoints and what MLflow holds stay as seen
                resume_from = resolve_resume("auto", out / "checkpoints")
                checkpointed = int(resume_from.name.removeprefix("step_")) if resume_from else None
                if checkpointed is not None and max(logged_steps(run_id), default=0) > checkpointed:
                    break
                job.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        job.kill()
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    repeated = [s for s in logged_steps(run_id) if s > checkpointed]
    assert repeated, "nothing past the checkpoint reached MLflow before the kill"

    run(cmd + ["--resume", "auto"], timeout=400)
    steps = list(range(1, 61))
    assert [line["step"] for line in metric_lines(out)] == steps
    for key in ("loss", "loss_mlm", "lr"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == steps, (key, repeated)  # steps past the checkpoint once
    jsonl = {line["step"]: line["loss"] for line in metric_lines(out)}
    assert all(m.value == pytest.approx(jsonl[m.step], rel=1e-9) for m in client.get_metric_history(run_id, "loss"))
    assert client.get_run(run_id).data.tags["distil.resumed_at_step"] == str(checkpointed)
