"""A team's MLflow server with accounts, as a team runs it: launch/mlflow_server.sh --team (MLflow's basic-auth
app), the admin's password from a file, users made with `distil tracking-user`, a tracked `distil train` run
under one user's name. Checked against the real server: no credentials -> 401; a read-only user reads the
run and is refused a write until granted EDIT on the experiment; no password appears in the server's
command lines, its settings file, the run's params and tags, the run folder or any output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from distributed_helpers import BIN, REPO, env, make_shards
from mlflow_test_server import MlflowServer

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

ADMIN_PW, ALICE_PW, BOB_PW = "adm1n-s3cret-pw", "al1ce-s3cret-pw", "b0b-s3cret-pw"
SECRETS = (ADMIN_PW, ALICE_PW, BOB_PW, "al1ce-typo")


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    pw_file = root / "admin_password"
    pw_file.write_text(ADMIN_PW + "\n")
    server = MlflowServer(root / "server", args=("--team", "--host", "127.0.0.1", "--admin-password-file",
                                                 str(pw_file)))
    server.start()
    try:
        yield server, root
    finally:
        server.stop()


def as_user(user: str | None, password: str | None) -> dict[str, str]:
    e = env()
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        e.pop(key, None)
    if user is not None:
        e.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return e


def distil(*args: str, user: str | None = "admin", password: str | None = ADMIN_PW,
           stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "distil"), *args], cwd=REPO, env=as_user(user, password), input=stdin,
                          capture_output=True, text=True, timeout=300)


def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def client_as(monkeypatch, server: MlflowServer, user: str, password: str):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return mlflow.MlflowClient(tracking_uri=server.uri)


def test_a_team_server_with_accounts(team, tmp_path, monkeypatch):
    server, root = team
    search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert http_status(search) == 401  # nobody unnamed
    assert http_status(search, "admin", "wrong") == 401
    assert http_status(search, "admin", ADMIN_PW) == 200

    # accounts, made by the admin; passwords from a file and from the hidden prompt
    (tmp_path / "alice").write_text(ALICE_PW + "\n")
    made = distil("tracking-user", "add", "alice", "--password-file", str(tmp_path / "alice"),
                  "--tracking-uri", server.uri)
    assert made.returncode == 0, made.stderr[-2000:]
    made = distil("tracking-user", "add", "bob", "--tracking-uri", server.uri, stdin=f"{BOB_PW}\n{BOB_PW}\n")
    assert made.returncode == 0, made.stderr[-2000:]
    refused = distil("tracking-user", "add", "carol", "--password-file", str(tmp_path / "alice"),
                     "--tracking-uri", server.uri, password="not-the-admins")
    errors = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "refused the admin's credentials" in errors[0]
    again = distil("tracking-user", "add", "alice", "--password-file", str(tmp_path / "alice"),
                   "--tracking-uri", server.uri)
    assert again.returncode == 2 and "already exists" in again.stderr
    by_bob = distil("tracking-user", "add", "dave", "--password-file", str(tmp_path / "alice"),
                    "--tracking-uri", server.uri, user="bob", password=BOB_PW)
    assert by_bob.returncode == 2 and "an admin's credentials are needed" in by_bob.stderr

    # alice trains, tracked under her name (MLflow's standard variables; nothing in the config)
    shards = make_shards(tmp_path)
    out = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
         f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=4", "run.log_every=1",
         "run.export=false", "tracking.enabled=true", f"tracking.tracking_uri={server.uri}",
         "tracking.experiment=team", "tracking.run_name=alice-run", "tracking.system_metrics=false"],
        cwd=REPO, env=as_user("alice", ALICE_PW), capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    wrong = subprocess.run(  # a typo in the password: one error line, and the run trains untracked
        [sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
         f"data.shards={shards}", f"run.output_dir={tmp_path / 'wrong'}", "run.max_steps=2", "run.log_every=1",
         "run.export=false", "tracking.enabled=true", f"tracking.tracking_uri={server.uri}",
         "tracking.experiment=team"],
        cwd=REPO, env=as_user("alice", "al1ce-typo"), capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 0, wrong.stderr[-3000:]
    refusals = [x for x in wrong.stderr.splitlines() if "refused" in x]
    assert len(refusals) == 1 and " ERROR " in refusals[0], wrong.stderr[-3000:]
    assert "refused the credentials of 'alice' (401)" in refusals[0] and "MLFLOW_TRACKING_PASSWORD" in refusals[0]
    assert [json.loads(x)["step"] for x in (tmp_path / "wrong" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a writer reviews the experiment
    review = distil("review", "--experiment", "team", "--tracking-uri", server.uri, user="alice",
                    password=ALICE_PW)
    assert review.returncode == 0 and "alice-run" in review.stdout, review.stderr[-2000:]

    bob = client_as(monkeypatch, server, "bob", BOB_PW)
    experiment = bob.get_experiment_by_name("team")
    [run] = bob.search_runs([experiment.experiment_id])  # READ: bob sees alice's run
    assert run.info.status == "FINISHED"
    assert [m.step for m in bob.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|403"):
        bob.log_metric(run.info.run_id, "bob_was_here", 1.0)
    # alice created the experiment through her run, so she manages it
    client_as(monkeypatch, server, "alice", ALICE_PW).log_metric(run.info.run_id, "alice_note", 1.0)
    bob = client_as(monkeypatch, server, "bob", BOB_PW)
    granted = distil("tracking-user", "grant", "bob", "--experiment", "team", "--permission", "EDIT",
                     "--tracking-uri", server.uri)
    assert granted.returncode == 0, granted.stderr[-2000:]
    bob.log_metric(run.info.run_id, "bob_was_here", 1.0)
    missing = distil("tracking-user", "grant", "bob", "--experiment", "nope", "--tracking-uri", server.uri)
    assert missing.returncode == 2 and "has no experiment 'nope'" in missing.stderr

    # no password anywhere a person or a log would see it
    seen = [made.stdout, made.stderr, refused.stdout, refused.stderr, trained.stdout, trained.stderr,
            wrong.stdout, wrong.stderr, review.stdout, review.stderr,
            granted.stdout, granted.stderr, (root / "server" / "basic_auth.ini").read_text(),
            (root / "server" / "server.log").read_text(), repr(run.data.params), repr(run.data.tags)]
    seen += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.stat().st_size < 2_000_000]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            seen.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        except OSError:
            continue
    for text in seen:
        for secret in SECRETS:
            assert secret not in text
