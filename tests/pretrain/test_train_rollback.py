"""run.on_nonfinite=rollback on real runs: the loss of chosen steps is made NaN on every rank
(DISTIL_FAULT_NONFINITE_STEPS: the real batches through the real engine), and the run goes back to the
newest intact checkpoint, skips the batches since it, finishes, and says what it did."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import REPO, env, free_port, make_shards
from mlflow_test_server import running_server

from distil.pretrain.checkpoint.files import read_trainer_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("rollback-mlflow"))


def test_two_processes_roll_back_spoilt_weights_and_finish(shards, server, tmp_path):
    """ZeRO 0 in fp32 applies a NaN update (the weights are spoilt, as after a loss spike): the run reloads
    step 8's checkpoint, skips the batches of step 9 and finishes with finite losses; tracked by a real
    `mlflow server`, whose run holds the rollback's tag and the `rollbacks` metric."""
    out = tmp_path / "run"
    e = env()
    e.update(NUM_GPUS="2", MASTER_PORT=str(free_port()), DISTIL_FAULT_NONFINITE_STEPS="9")
    p = subprocess.run(["bash", "launch/local.sh", "configs/tiny_mlm_cpu.yaml", f"data.shards={shards}",
                        f"run.output_dir={out}", "run.max_steps=14", "run.log_every=1", "checkpoint.every=4",
                        "engine.zero_stage=0", "run.on_nonfinite=rollback", "run.export=false",
                        "tracking.enabled=true", f"tracking.tracking_uri={server.uri}", "tracking.experiment=rollback",
                        "tracking.run_name=spoilt", "tracking.system_metrics=false"],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    log = p.stdout + p.stderr
    assert "rolled back to step_00000008" in log and "the batches of steps 9-9 are skipped" in log, log[-3000:]
    rows = lines(out)
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert [r["rollbacks"] for r in rows] == [0.0] * 8 + [1.0] * 6
    assert not math.isfinite(rows[8]["loss"])  # step 9, the injected NaN
    assert all(math.isfinite(r["loss"]) for r in rows[9:])  # the weights were restored
    final = read_trainer_state(out / "checkpoints" / "step_00000014")["counters"]
    assert final["rollbacks"] == 1 and final["skipped_windows"] == [[9, 9]]
    # the rollback wrote its checkpoint at once: step 9's holds step 8's weights and the record
    at_rollback = out / "checkpoints" / "step_00000009"
    if at_rollback.exists():  # rotation (checkpoint.keep=2) may have removed it by the end
        assert read_trainer_state(at_rollback)["counters"]["skipped_windows"] == [[9, 9]]
    import mlflow

    client = mlflow.MlflowClient(server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("rollback").experiment_id])
    assert run.info.status == "FINISHED"
    assert "rolled back to step_00000008" in run.data.tags["distil.rollback.1"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "rollbacks"))
    assert history == [(s, 0.0) for s in range(1, 9)] + [(s, 1.0) for s in range(9, 15)]


def test_without_a_rollback_left_the_run_stops(shards, tmp_path):
    """One process, ZeRO-2 (updates with non-finite gradients skipped): the first streak (steps 5-6) is rolled
    back; the second (steps 9-10) finds run.max_rollbacks=1 spent and stops as on_nonfinite=stop does."""
    out = tmp_path / "run"
    e = env()
    e.update(DISTIL_FAULT_NONFINITE_STEPS="5-6,9-10")
    p = subprocess.run([sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
                        f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=14", "run.log_every=1",
                        "checkpoint.every=2", "run.max_nonfinite_steps=2", "run.on_nonfinite=rollback",
                        "run.max_rollbacks=1"], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "rolled back to step_00000004" in p.stderr and "the batches of steps 5-6 are skipped" in p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "at step 10" in errors[0] and "run.max_rollbacks=1" in errors[0], p.stderr[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000008"  # the last good one, nothing written during the second streak
    assert read_trainer_state(out / "checkpoints" / latest)["counters"]["skipped_windows"] == [[5, 6]]


def test_a_bad_fault_spec_or_policy_is_one_error_line(shards, tmp_path):
    for extra, e_extra, expect in ((["run.on_nonfinite=retry"], {}, "run.on_nonfinite='retry' must be stop or rollback"),
                                   ([], {"DISTIL_FAULT_NONFINITE_STEPS": "nine"}, "expected steps such as")):
        e = env()
        e.update(e_extra)
        p = subprocess.run([sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
                            f"data.shards={shards}", f"run.output_dir={tmp_path / 'bad'}", *extra],
                           cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
        errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1 and expect in errors[0], p.stderr[-2000:]
