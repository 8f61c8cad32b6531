"""`sbatch launch/slurm.sbatch` on a real one-host SLURM cluster (slurm_cluster.py), the script itself, not
a copy: a tiny 2-process CPU distillation submitted with a 1-minute time limit and its early signal due
at once.

One job lives through every way a cluster stops it:
1. SLURM's time-limit signal (--signal=TERM@60 with --time=1): the trainer checkpoints and exits 143 and the
   script requeues the job itself (`--requeue` alone does not requeue at the time limit);
2. `scontrol requeue` of the running job (what preemption does): SIGTERM to the job, checkpoint, SLURM
   requeues it;
3. the last start resumes with --resume auto and finishes.
The export is then bitwise the export of an uninterrupted run, metrics.jsonl holds each step once, the
MLflow run is one run tagged with its restart count, and the job log (appended across restarts) tells the
story. The test cluster shortens SLURM's wait before a requeued job starts again (AuthInfo cred_expire:
120 s by default).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import (
    REPO,
    env,
    finish_ranks,
    free_port,
    latest_step,
    metric_steps,
    same_weights,
    start_ranks,
)
from slurm_cluster import SlurmCluster, missing_programs
from system_programs import skip_or_fail

pytestmark = pytest.mark.slow

STEPS = 500


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        skip_or_fail(f"SLURM is not installed ({', '.join(missing)} missing); scripts/system_packages.sh installs "
                     "slurmctld, slurmd, slurm-client and munge where apt-get runs as root")
    if os.geteuid() != 0:
        skip_or_fail("the one-host test cluster runs slurmctld/slurmd as root (SlurmUser=root); not root here")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cancel_jobs()  # a test that failed midway leaves no job (nor its ranks) running
        cluster.stop()


def distill_args(shards: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"teacher.path={teacher}", f"run.output_dir={out}", f"run.max_steps={STEPS}",
            "run.log_every=10", "checkpoint.every=50", "checkpoint.keep=2",
            "data.num_workers=2", *extra]  # loader workers as the recipe configs; later keys win


def job_env(slurm: SlurmCluster) -> dict[str, str]:
    return slurm.env(env(MASTER_PORT=str(free_port())))


def wait_job(slurm: SlurmCluster, job: str, condition, timeout: float, what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = slurm.job(job)
        if condition(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job}: no {what} within {timeout} s: {info}\n{slurm.logs()}")
        time.sleep(0.3)


def test_time_limit_requeue_preemption_resume_finish(slurm, shards, teacher, tmp_path):
    reference = tmp_path / "reference"
    ranks = start_ranks(["--config", "configs/tiny_cpu.yaml", *distill_args(shards, teacher, reference),
                         "tracking.enabled=false"], world=2)  # runs beside the job, while it waits on SLURM
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    out = submit_dir / "run"
    p = slurm.run("sbatch", "--parsable", "--time=1", "--signal=TERM@60", "--ntasks-per-node=2",
                  "--cpus-per-task=1", "--gpus-per-node=0", "--job-name=distil-test",
                  str(REPO / "launch" / "slurm.sbatch"), str(REPO / "configs" / "tiny_cpu.yaml"),
                  *distill_args(shards, teacher, out), "tracking.enabled=true", "tracking.system_metrics=false",
                  "tracking.registered_model_name=null", env=job_env(slurm), cwd=submit_dir)
    job = p.stdout.strip().split(";")[0]
    log = submit_dir / f"distil-test-{job}.out"

    # 1. the time-limit signal: checkpoint, exit 143, requeued by the script
    wait_job(slurm, job, lambda j: j.get("Restarts") == "1", 300, "requeue after the time-limit signal")
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=15")  # later starts are not time-limited
    first_stop = latest_step(out)
    assert first_stop is not None and first_stop < STEPS, (
        f"the run finished (step {first_stop}) before SLURM's time-limit signal: raise STEPS\n{log.read_text()}")
    text = log.read_text()
    assert "training step exited with status 143" in text and "requeued job" in text, text

    # 2. scontrol requeue of the running job (as preemption does) once it has made progress
    wait_job(slurm, job, lambda j: j.get("JobState") == "RUNNING", 120, "second start")
    deadline = time.monotonic() + 300
    while (latest_step(out) or 0) <= first_stop:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)
    slurm.run("scontrol", "requeue", job)
    wait_job(slurm, job, lambda j: j.get("Restarts") == "2", 120, "requeue by scontrol")

    # 3. the last start finishes
    info = wait_job(slurm, job, lambda j: j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                    600, "end of the job")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert text.count("distil: job") == 3 and "(restart 2)" in text, text  # one log, appended by every start

    finish_ranks(ranks)
    same_weights(reference / "export", out / "export")
    assert metric_steps(out) == list(range(10, STEPS + 1, 10))
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{submit_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    tags = runs[0].data.tags
    assert tags["distil.restarts"] == "2" and tags["distil.slurm_restart_count"] == "2", tags
    assert runs[0].info.status == "FINISHED"


def test_a_scheduled_window_ends_with_more_to_do_and_is_not_requeued(slurm, shards, teacher, tmp_path):
    """launch/scheduled.sh --slurm (what launch/distil.cron runs on a SLURM cluster): the window's job stops
    at run.time_limit_minutes with a checkpoint and ends with exit code 3, and is not requeued (the next
    window continues; test_cluster_time_limit.py runs the whole cycle of windows in the local mode)."""
    out = tmp_path / "run"
    e = job_env(slurm)
    e.update(DISTIL_WINDOW_MARGIN_MINUTES="1.7", SBATCH_OPTIONS=(
        f"--ntasks-per-node=1 --cpus-per-task=1 --gpus-per-node=0 --signal=TERM@5 --job-name=distil-window "
        f"--output={tmp_path}/%x-%j.out"))
    p = subprocess.run(["bash", "launch/scheduled.sh", "--slurm", "2", "configs/tiny_cpu.yaml",
                        *distill_args(shards, teacher, out, "run.max_steps=100000")],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Submitted batch job" in p.stdout, p.stderr
    job = p.stdout.split()[-1]
    info = wait_job(slurm, job, lambda j: j.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING",
                                                                    "CONFIGURING"), 300, "end of the window")
    text = (tmp_path / f"distil-window-{job}.out").read_text()
    assert info["ExitCode"] == "3:0" and info.get("Restarts") == "0", (info, text[-3000:])
    assert "not requeueing (DISTIL_REQUEUE=0)" in text, text[-3000:]
    assert 0 < (latest_step(out) or 0) < 100000 and not (out / "export").exists()
