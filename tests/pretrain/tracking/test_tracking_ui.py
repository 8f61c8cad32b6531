"""The MLflow UI as a user sees it: a real `mlflow server` (launch/mlflow_server.sh on 127.0.0.1), a short
tracked `distil train` run without a run name, and the links it and `distil review` print, opened in headless
Chromium. Checked from the rendered page: the link lands on the runs table (MLflow 3 opens an experiment on
its GenAI overview otherwise), the run is named after its folder and mode, and its dataset is the shard set
with the manifest's digest.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import BIN, make_shards
from mlflow_test_server import running_server
from system_programs import skip_or_fail

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXPERIMENT = "ui-check"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("ui-mlflow"))


def rendered_text(url: str, profile: Path, budget_ms: int) -> str:
    """The page's text once its scripts ran (and fetched the runs) in headless Chromium."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         f"--virtual-time-budget={budget_ms}", "--window-size=1600,1000", "--dump-dom", url],
        capture_output=True, text=True, timeout=240)
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", result.stdout, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def page_showing(url: str, profile: Path, *expected: str) -> str:
    """The rendered text, tried again with more time while a loaded machine has not rendered all of it yet."""
    text = ""
    for budget_ms in (15_000, 30_000, 60_000):
        text = rendered_text(url, profile, budget_ms)
        if all(e in text for e in expected):
            break
    return text


def link_after(prefix: str, output: str) -> str:
    found = re.search(re.escape(prefix) + r"(\S+)", output)
    assert found, f"no line with {prefix!r} in:\n{output[-3000:]}"
    return found.group(1)


def test_printed_links_open_the_runs_table_with_the_runs_name_and_dataset(shards, server, tmp_path):  # noqa: F811
    if CHROMIUM is None:
        skip_or_fail("chromium is not installed (scripts/system_packages.sh installs it where apt-get runs as root)")
    from distil.data_pipeline.manifest import load_manifest
    from distil.pretrain.tracking.lineage import manifest_digest

    out = tmp_path / "teacher"
    train = subprocess.run(
        [sys.executable, "-m", "distil.pretrain.train", "--config", "configs/tiny_mlm_cpu.yaml",
         f"data.shards={shards}", f"run.output_dir={out}", "run.max_steps=2", "run.log_every=1",
         "run.export=false", "checkpoint.every=100", "tracking.enabled=true", f"tracking.tracking_uri={server.uri}",
         f"tracking.experiment={EXPERIMENT}", "tracking.system_metrics=false"],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=600)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-5000:]
    run_link = link_after("MLflow run teacher-mlm ended FINISHED: ", log)  # no run_name: folder + mode
    review = subprocess.run([str(BIN / "distil"), "review", "--experiment", EXPERIMENT, "--tracking-uri",
                             server.uri, "--output", str(tmp_path / "cmp.png")],
                            capture_output=True, text=True, timeout=300)
    assert review.returncode == 0, review.stdout[-3000:] + review.stderr[-3000:]
    experiment_link = link_after("in the MLflow UI: ", review.stdout)
    assert experiment_link.startswith(server.uri) and run_link.startswith(experiment_link.split("?")[0])

    dataset = f"shards ({manifest_digest(load_manifest(shards)[0])})"
    table = page_showing(experiment_link, tmp_path / "profile", "teacher-mlm", dataset)
    assert "Run Name" in table and "Dataset" in table, table[:2000]  # the runs table, not the GenAI overview
    assert "teacher-mlm" in table and dataset in table, table[:2000]
    run_page = page_showing(run_link, tmp_path / "profile", "teacher-mlm", dataset, "distil train")
    assert "teacher-mlm" in run_page and dataset in run_page and "distil train" in run_page, run_page[:2000]
