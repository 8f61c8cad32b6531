"""The MLflow tracker against a real `mlflow server` (launch/mlflow_server.sh on 127.0.0.1, a free port).

One server serves the whole module; the outage test runs its own server because it kills it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow_test_server import MlflowServer, free_port, running_server  # noqa: E402

from distil.pretrain.tracking.config import TrackingConfig  # noqa: E402
from distil.pretrain.tracking.mlflow_tracker import MlflowTracker, create_tracker  # noqa: E402
from distil.pretrain.tracking.params import clean_metrics, clean_params  # noqa: E402
from distil.pretrain.tracking.system_metrics import NodeReporter  # noqa: E402
from distil.pretrain.tracking.tracker import NullTracker  # noqa: E402

FAST = dict(system_metrics_interval_s=0.2, retry_interval_s=0.3, finish_timeout_s=120.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("mlflow-server"))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A tiny exported student: DistilBertForMaskedLM + a word-piece tokenizer, as the trainer exports it."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForMaskedLM

    out = tmp_path_factory.mktemp("student")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    config = DistilBertConfig(vocab_size=len(vocab), dim=16, hidden_dim=32, n_layers=1, n_heads=2,
                              max_position_embeddings=32)
    DistilBertForMaskedLM(config).save_pretrained(out)
    return out


def loaded_student(path: Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(path)


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "distil.tracking" and r.levelno >= logging.WARNING]


def test_params_are_flattened_truncated_and_secrets_redacted():
    params = clean_params({"model": {"teacher": "bert", "layers": [0, 2, 4]}, "hf_token": "abc",
                           "tracking": {"uri": "http://user:pw@host:5000"}, "note": "x" * 7000, "bad key!": 1})
    assert params["model.teacher"] == "bert"
    assert params["model.layers"] == "[0, 2, 4]"
    assert params["hf_token"] == "***"
    assert params["tracking.uri"] == "http://***@host:5000"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    assert params["bad key_"] == "1"
    assert clean_metrics({"loss": 1, "ok": True, "name": "x", "lr": 0.5}) == {"loss": 1.0, "ok": 1.0, "lr": 0.5}


def test_disabled_and_nonzero_ranks_get_null_trackers(tmp_path):
    off = TrackingConfig(enabled=False)
    assert type(create_tracker(off, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path))) is NullTracker
    on = TrackingConfig(tracking_uri="http://127.0.0.1:9")  # nothing listens there
    assert type(create_tracker(on, rank=1, local_rank=1, world_size=2, run_dir=str(tmp_path))) is NullTracker


def test_rank0_logs_params_metrics_system_metrics_artifacts_and_registered_model(server, student_dir, tmp_path):
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="logs-everything", run_name="students-1",
                         registered_model_name="tiny-student", **FAST)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process_wide_uri = mlflow.get_tracking_uri()
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=2, run_dir=str(run_dir))
    assert isinstance(tracker, MlflowTracker) and tracker.run_id
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  lr: 0.0005\n")
    tracker.log_params({"train": {"lr": 5e-4, "epochs": 3}, "hub_token": "secret-value"})
    for step in range(1, 6):
        metrics = {"loss/total": 10.0 / step, "loss/ce": 4.0 / step, "lr": 1e-4 * step, "tokens_per_s": 1000.0}
        tracker.log_metrics(metrics, step=step)
        with open(run_dir / "metrics.jsonl", "a") as f:  # what the trainer writes beside
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    tracker.log_metrics({"grad_norm": float("nan"), "loss_scale": float("inf"), "loss/total": 1.0}, step=6)
    tracker.log_artifact(str(config_file), "config")
    assert tracker.flush(60)
    tracker.log_student(str(student_dir))
    tracker.finish("FINISHED")
    assert mlflow.get_tracking_uri() == process_wide_uri  # the tracker leaves no process-wide setting behind

    client = server.client()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "students-1"
    assert run.data.params["train.lr"] == "0.0005" and run.data.params["train.epochs"] == "3"
    assert run.data.params["hub_token"] == "***"
    history = client.get_metric_history(tracker.run_id, "loss/total")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (s, 10.0 / s) for s in range(1, 6)] + [(6, 1.0)]  # a batch holding NaN/inf values was not refused
    assert math.isnan(run.data.metrics["grad_norm"]) and run.data.metrics["loss_scale"] > 1e300
    system = [k for k in run.data.metrics if k.startswith("system/node_0/")]
    assert "system/node_0/cpu_utilization_percentage" in system
    tags = run.data.tags
    assert tags["distil.world_size"] == "2" and tags["distil.num_nodes"] == "1"
    assert tags["distil.gpu_type"] == "cpu"
    for package in ("torch", "deepspeed", "transformers", "triton"):
        assert tags[f"distil.version.{package}"]
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert [a.path for a in client.list_artifacts(tracker.run_id, "config")] == ["config/config.yaml"]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/loss_curves.png"]
    assert tags["distil.num_parameters"] == str(sum(p.numel() for p in loaded_student(student_dir).parameters()))
    versions = client.search_model_versions(f"name='tiny-student' and run_id='{tracker.run_id}'")
    assert len(versions) == 1
    model = client.get_logged_model(tags["distil.student_model_uri"].split("/")[-1])
    assert model.experiment_id == run.info.experiment_id and model.name == "students-1"  # not in Default
    assert model.tags["distil.model_path"] == str(student_dir.resolve())  # what a student of it links
    mlflow.set_tracking_uri(server.uri)  # how a user loads it: models:/ URIs resolve against this
    try:
        loaded = mlflow.transformers.load_model("models:/tiny-student/1")
    finally:
        mlflow.set_tracking_uri(process_wide_uri)
    assert loaded("w1 [MASK] w2")  # a working fill-mask pipeline came back from the registry


def test_resumed_tracker_appends_to_the_same_run(server, tmp_path):
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="resume", system_metrics=False, **FAST)
    first = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path))
    first.log_params({"max_steps": 3, "seed": 1})
    for step in range(3):
        first.log_metrics({"loss": float(10 - step)}, step)
    first.finish("KILLED")
    client = server.client()
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path),
                            resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    second.log_params({"max_steps": 6, "seed": 1})  # a changed value cannot overwrite an MLflow param
    for step in range(3, 6):
        second.log_metrics({"loss": float(10 - step)}, step)
    second.finish("FINISHED")

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["max_steps"] == "3" and run.data.tags["distil.resume_param.max_steps"] == "6"
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "loss"))
    assert steps == list(range(6))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_nonzero_ranks_never_reach_the_server(server, tmp_path):
    import torch.distributed as dist

    client = server.client()
    experiment = client.get_experiment_by_name("logs-everything")
    runs_before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    requests_before = len(server.api_requests())
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="logs-everything", **FAST)
    trackers = [
        create_tracker(cfg, rank=1, local_rank=1, world_size=4, run_dir=str(tmp_path), num_nodes=2),
        # local rank 0 of the second node: samples its node into the torch.distributed store only
        create_tracker(cfg, rank=2, local_rank=0, world_size=4, run_dir=str(tmp_path), num_nodes=2,
                       store=dist.HashStore()),
    ]
    assert type(trackers[0]) is NullTracker and isinstance(trackers[1], NodeReporter)
    for tracker in trackers:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_artifact(__file__)
        tracker.log_student(str(tmp_path))
        assert tracker.run_id is None
        tracker.finish("FINISHED")
    assert len(server.api_requests()) == requests_before
    runs_after = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    assert runs_after == runs_before


def test_other_nodes_system_metrics_reach_rank0_through_the_store(server, tmp_path):
    import torch.distributed as dist

    store = dist.HashStore()  # stands in for the job's TCPStore served by rank 0
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="nodes", **FAST)
    reporter = create_tracker(cfg, rank=4, local_rank=0, world_size=8, run_dir=str(tmp_path), num_nodes=2,
                              store=store)
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=8, run_dir=str(tmp_path), num_nodes=2,
                             store=store)
    deadline = time.monotonic() + 60
    while not store.check(["distil/system_metrics/node_1"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a few more sampling rounds on both sides
    reporter.finish()
    tracker.finish("FINISHED")
    run = server.client().get_run(tracker.run_id)
    assert "system/node_0/cpu_utilization_percentage" in run.data.metrics
    assert "system/node_1/cpu_utilization_percentage" in run.data.metrics
    assert run.data.tags["distil.num_nodes"] == "2"
    assert "distil.node.node_1.hostname" in run.data.tags


def test_server_down_at_start_then_killed_mid_run_training_goes_on_and_metrics_arrive(tmp_path, caplog):
    """One server process group, started late, killed mid-run, restarted on the same port and store."""
    caplog.set_level(logging.INFO, logger="distil.tracking")
    server = MlflowServer(tmp_path / "server")  # not started yet: its port refuses connections
    try:
        # 1. unreachable at start: the run is created once the server answers
        late_cfg = TrackingConfig(tracking_uri=server.uri, experiment="late-server", system_metrics=False, **FAST)
        late = create_tracker(late_cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path / "late"))
        assert late.run_id is None and late.offline
        late.log_params({"seed": 7})
        late.log_metrics({"loss": 3.0}, 1)
        assert len(tracker_warnings(caplog)) == 1
        server.start()
        assert late.flush(120) and late.run_id
        late.finish("FAILED")
        client = server.client()
        run = client.get_run(late.run_id)
        assert run.info.status == "FAILED" and run.data.params["seed"] == "7" and run.data.metrics["loss"] == 3.0
        caplog.clear()

        # 2. the server dies mid-run: every call returns, one warning, the metrics wait in the buffer
        cfg = TrackingConfig(tracking_uri=server.uri, experiment="outage", **FAST)
        tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path / "run"))
        run_id = tracker.run_id
        tracker.log_metrics({"loss": 100.0}, 0)
        assert tracker.flush(60)
        server.kill()
        for step in range(1, 41):
            tracker.log_metrics({"loss": 100.0 - step}, step)
            if step == 20:
                tracker.log_params({"during_outage": True})
        deadline = time.monotonic() + 60
        while not tracker.offline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracker.offline
        assert not tracker.flush(1.0)  # nothing can be sent while the server is down
        warnings = tracker_warnings(caplog)
        assert len(warnings) == 1 and "unreachable" in warnings[0]

        # 3. restarted: the buffered metrics arrive, the run ends as it really ended
        server.start()
        assert tracker.flush(120)
        tracker.finish("FINISHED")
        assert len(tracker_warnings(caplog)) == 1  # still the one warning
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["during_outage"] == "True"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert steps == list(range(41))
    finally:
        server.stop()


def test_finish_with_the_server_gone_returns_and_says_what_was_not_sent(tmp_path, caplog):
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", system_metrics=False,
                         finish_offline_wait_s=0.5, **FAST)
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path))
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_metrics({"loss": 0.5, "not_a_number": "x"}, "2")  # sloppy input is cleaned, never raised
    tracker.finish("KILLED")
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 2 and "unreachable" in warnings[0]
    assert "2 metric points" in warnings[1] and "could not be sent" in warnings[1]


@pytest.mark.parametrize("args, message", [(["--port", "http"], "--port must be a number"),
                                           (["--bogus"], "unknown option --bogus")])
def test_server_script_rejects_bad_options_in_one_line(args, message):
    import subprocess

    from mlflow_test_server import SCRIPT

    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("changes, key", [({"experiment": " "}, "tracking.experiment"),
                                          ({"tracking_uri": "localhost:5000"}, "tracking.tracking_uri"),
                                          ({"retry_interval_s": 0}, "tracking.retry_interval_s"),
                                          ({"max_buffered_metrics": 0}, "tracking.max_buffered_metrics")])
def test_config_errors_name_the_key(changes, key):
    from distil.common.errors import UserError

    TrackingConfig().validate()
    TrackingConfig(tracking_uri="http://127.0.0.1:5000", registered_model_name=None).validate()
    with pytest.raises(UserError, match=key):
        TrackingConfig(**changes).validate()


def _two_node_worker(rank: int, uri: str, port: int, run_dir: str, result_file: str) -> None:
    """One process of a 2-process gloo job that pretends to span 2 nodes (each process is local rank 0)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = TrackingConfig(tracking_uri=uri, experiment="two-nodes", system_metrics_interval_s=0.3)
    tracker = create_tracker(cfg, rank=rank, local_rank=0, world_size=2, run_dir=run_dir, num_nodes=2)
    for step in range(8):  # "training": collectives while both samplers run
        total = torch.ones(1)
        dist.all_reduce(total)
        tracker.log_metrics({"loss": float(total)}, step)
        time.sleep(0.3)
    dist.barrier()
    if rank == 1:
        tracker.finish()
    dist.barrier()  # node 1's sampler stopped after posting; rank 0 reads the store at its last tick
    if rank == 0:
        tracker.finish("FINISHED")
        Path(result_file).write_text(tracker.run_id or "")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_job_node_metrics_travel_through_the_jobs_tcpstore(server, tmp_path):
    import multiprocessing

    from mlflow_test_server import free_port

    context = multiprocessing.get_context("spawn")
    port = free_port()
    result = tmp_path / "run_id"
    workers = [context.Process(target=_two_node_worker, args=(rank, server.uri, port, str(tmp_path), str(result)))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(240)
    assert [w.exitcode for w in workers] == [0, 0]
    run = server.client().get_run(result.read_text())
    assert "system/node_0/cpu_utilization_percentage" in run.data.metrics
    assert "system/node_1/cpu_utilization_percentage" in run.data.metrics
    assert "distil.node.node_1.hostname" in run.data.tags
    assert sorted(m.step for m in server.client().get_metric_history(run.info.run_id, "loss")) == \
        list(range(8))


def test_local_sqlite_store_logs_and_registers_the_student(student_dir, tmp_path, caplog):
    """The default store (no server): registering resolves `models:/<id>` against this run's SQLite file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=uri, experiment="local-store", registered_model_name="local-student",
                         system_metrics=False, **FAST)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process_wide = mlflow.get_tracking_uri()
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(run_dir))
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_student(str(student_dir))
    tracker.finish("FINISHED")
    assert mlflow.get_tracking_uri() == process_wide
    # nor what child processes inherit (set_tracking_uri exports it; a later subprocess tracked elsewhere)
    assert os.environ.get("MLFLOW_TRACKING_URI") == exported
    assert tracker_warnings(caplog) == []
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"name='local-student' and run_id='{tracker.run_id}'")
    assert len(versions) == 1
    assert client.get_run(tracker.run_id).data.tags["distil.registered_model"] == "local-student/1"


# -- issue 15: runs as a user sees them in the MLflow UI: names, source, lineage, links ------------------------

def tiny_manifest(folder: Path):
    """A shard set's manifest (two train shards, one held-out), written where `distil prepare` puts it."""
    from distil.data_pipeline.manifest import Manifest, ShardInfo, SpecialTokens

    manifest = Manifest(shards=[ShardInfo("train-0.tar", 10, 300), ShardInfo("train-1.tar", 5, 150)],
                        holdout_shards=[ShardInfo("holdout-0.tar", 3, 90)], vocab_size=32,
                        special_tokens=SpecialTokens(pad=0, cls=2, sep=3, mask=4, unk=1), max_len=64,
                        dtype="uint16", tokenizer_name="tiny-wordpiece", tokenizer_sha256="0" * 64)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(manifest.to_json())
    return manifest


def test_run_names_come_from_the_run_and_never_from_the_seeded_random_generator(tmp_path):
    """MLflow names an unnamed run from Python's global random generator; training seeds it, so every run
    with one seed got the same name (and with a local store the draw moved rank 0's seeded generator).
    In a fresh process: in the test process, threads other tests left behind (an MLflow client's retries)
    may draw from the same generator meanwhile."""
    code = f"""
import json, random
import mlflow
from distil.pretrain.tracking.config import TrackingConfig, default_run_name
from distil.pretrain.tracking.mlflow_tracker import create_tracker
from pathlib import Path
tmp = Path({str(tmp_path)!r})
uri = f"sqlite:///{{tmp / 'mlflow.db'}}"
random.seed(56)  # what seed_everything(run.seed) does before the tracker starts
state = random.getstate()
names = []
for folder, mode, given in (("teacher", "mlm", None), ("student", "distill", None),
                            ("student", "distill", "my-run"), ("teacher-mlm", "mlm", None)):
    cfg = TrackingConfig(tracking_uri=uri, experiment="names", system_metrics=False, run_name=given,
                         **{FAST!r})
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp / folder),
                             run_name=default_run_name(tmp / folder, mode))
    tracker.finish("FINISHED")
    names.append(mlflow.MlflowClient(uri).get_run(tracker.run_id).info.run_name)
print(json.dumps({{"names": names, "untouched": random.getstate() == state}}))
"""
    p = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["names"] == ["teacher-mlm", "student-distill", "my-run", "teacher-mlm"]  # tracking.run_name wins
    assert result["untouched"]  # tracking drew nothing from the training's generator


def test_runs_carry_their_source_and_distils_experiments_open_as_model_training(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distil.tracking")
    client = server.client()
    theirs = client.create_experiment("made-elsewhere")
    for experiment in ("made-by-distil", "made-elsewhere"):
        cfg = TrackingConfig(tracking_uri=server.uri, experiment=experiment, system_metrics=False, **FAST)
        tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path / "teacher"),
                                 run_name="teacher-mlm", source="distil train")
        tracker.finish("FINISHED")
        tags = client.get_run(tracker.run_id).data.tags
        assert tags["mlflow.source.name"] == "distil train" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"]
    ours = client.get_experiment_by_name("made-by-distil")
    assert ours.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.experimentKind" not in client.get_experiment(theirs).tags  # someone else's is left alone
    run_link = f"{server.uri}/#/experiments/{ours.experiment_id}/runs/"
    lines = [r.getMessage() for r in caplog.records if r.name == "distil.tracking" and run_link in r.getMessage()]
    assert lines[0].startswith("MLflow run teacher-mlm: " + run_link)
    assert lines[0].endswith("?workflowType=machine_learning") and "ended FINISHED" in lines[1]


def test_a_resumed_run_keeps_its_name(server, tmp_path):
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="resume-name", system_metrics=False, **FAST)
    first = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path), run_name="student-distill")
    first.finish("KILLED")
    renamed = TrackingConfig(**{**cfg.__dict__, "run_name": "a-new-name"})
    second = create_tracker(renamed, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path),
                            resume_run_id=first.run_id)
    second.finish("FINISHED")
    assert server.client().get_run(first.run_id).info.run_name == "student-distill"
    assert second.run_name == "student-distill"
    assert second.ui_link().endswith(f"/runs/{first.run_id}?workflowType=machine_learning")


def test_the_shard_set_is_a_dataset_input_and_the_teacher_a_model_input(server, tmp_path):
    from distil.pretrain.tracking.lineage import manifest_digest

    client = server.client()
    manifest = tiny_manifest(tmp_path / "wiki_shards")
    teacher_dir = tmp_path / "teacher" / "export"
    teacher_dir.mkdir(parents=True)
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="lineage", system_metrics=False, **FAST)
    # the teacher's run logged its export (registry.py tags the logged model with its folder)
    teacher = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path / "teacher"))
    teacher.finish("FINISHED")
    experiment_id = client.get_experiment_by_name("lineage").experiment_id
    teacher_model = client.create_logged_model(experiment_id, name="teacher-mlm", source_run_id=teacher.run_id,
                                               tags={"distil.model_path": str(teacher_dir.resolve())})

    runs = {}
    for name, teacher_path in (("student-a", str(teacher_dir)), ("student-b", "bert-base-uncased"),
                               ("student-c", "bert-base-uncased")):
        run_cfg = TrackingConfig(**{**cfg.__dict__, "run_name": name})
        tracker = create_tracker(run_cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path / name))
        tracker.log_inputs(str(tmp_path / "wiki_shards"), manifest, model=teacher_path)
        tracker.log_inputs(str(tmp_path / "wiki_shards" / "manifest.json"), manifest, model=teacher_path)  # resume
        tracker.finish("FINISHED")
        runs[name] = client.get_run(tracker.run_id)

    inputs = runs["student-a"].inputs
    assert len(inputs.dataset_inputs) == 1  # logged again on resume: still one input
    dataset = inputs.dataset_inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("wiki_shards", manifest_digest(manifest))
    assert dataset.source_type == "local"
    assert json.loads(dataset.source) == {"uri": str((tmp_path / "wiki_shards").resolve())}
    profile = json.loads(dataset.profile)
    assert (profile["split"], profile["sequences"], profile["tokens"], profile["shards"]) == ("train", 15, 450, 2)
    assert [(t.key, t.value) for t in inputs.dataset_inputs[0].tags] == [("mlflow.data.context", "training")]
    assert [m.model_id for m in inputs.model_inputs] == [teacher_model.model_id]  # the teacher run's model

    # a teacher no run of the store logged (a hub id): recorded once as an external model, then reused
    hub = [m.model_id for name in ("student-b", "student-c") for m in runs[name].inputs.model_inputs]
    assert len(hub) == 2 and hub[0] == hub[1] != teacher_model.model_id
    external = client.get_logged_model(hub[0])
    assert external.name == "bert-base-uncased" and external.tags["mlflow.model.isExternal"] == "true"
    assert external.experiment_id == experiment_id

    # the held-out split is a dataset of its own (MLflow keys datasets by name and digest)
    evaluation = create_tracker(TrackingConfig(**{**cfg.__dict__, "run_name": "eval-x"}), rank=0, local_rank=0,
                                world_size=1, run_dir=str(tmp_path / "eval"))
    evaluation.log_inputs(str(tmp_path / "wiki_shards"), manifest, split="holdout", context="evaluation")
    evaluation.finish("FINISHED")
    held_out = client.get_run(evaluation.run_id).inputs.dataset_inputs[0]
    assert held_out.dataset.name == "wiki_shards:holdout" and json.loads(held_out.dataset.profile)["sequences"] == 3
    assert held_out.tags[0].value == "evaluation"


def test_links_open_the_model_training_view(tmp_path):
    from distil.pretrain.tracking.links import describe_link, serve_command, ui_base, ui_link

    assert ui_base("http://user:secret@host:5000/mlflow/") == "http://host:5000/mlflow"  # no credentials
    assert ui_base(f"sqlite:///{tmp_path}/mlflow.db") is None
    assert ui_link("https://mlflow.example.org", "7") == "https://mlflow.example.org/#/experiments/7?workflowType=machine_learning"
    assert ui_link("http://127.0.0.1:5001", "7", "abc") == \
        "http://127.0.0.1:5001/#/experiments/7/runs/abc?workflowType=machine_learning"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert describe_link(store, "1") == ("http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning "
                                         f"(after: mlflow ui --backend-store-uri {store})")
    assert serve_command("postgresql://user:pw@db/mlflow") == "mlflow ui --backend-store-uri postgresql://***@db/mlflow"
    assert ui_link("databricks", "1") is None


def test_review_and_the_quickstart_summary_print_the_experiment_link(tmp_path):
    from click.testing import CliRunner

    from distil.pretrain.cli import main
    from distil.pretrain.quickstart import experiment_link

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=store, experiment="quickstart", system_metrics=False, **FAST)
    tracker = create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(tmp_path / "teacher"),
                             run_name="teacher-mlm")
    tracker.log_params({"mode": "mlm"})
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.finish("FINISHED")
    experiment_id = mlflow.MlflowClient(store).get_experiment_by_name("quickstart").experiment_id
    expected = (f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning "
                f"(after: mlflow ui --backend-store-uri {store})")
    result = CliRunner().invoke(main, ["review", "--experiment", "quickstart", "--tracking-uri", store,
                                       "--output", str(tmp_path / "cmp.png")])
    assert result.exit_code == 0, result.output
    assert f"in the MLflow UI: {expected}" in result.output.replace("\n", "")
    assert experiment_link(store, "quickstart") == expected
