"""`distil train` refuses bad input with one `error:` line and exit status 2, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DISTIL = str(Path(sys.executable).parent / "distil")


def distil_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([DISTIL, "train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("overrides, needle", [
    (["loss.alpha_cosine=1"], "alpha_cosine"),
    (["engine.zero_stage=3"], "engine.zero_stage"),
    (["data.batch_size=5", "engine.gradient_accumulation_steps=2", "engine.global_batch_size=12"],
     "engine.global_batch_size=12"),
])
def test_config_errors(overrides, needle):
    assert needle in one_error(distil_train("--config", "configs/tiny_cpu.yaml", "data.shards=x", *overrides))


def test_missing_config_file(tmp_path):
    assert "does not exist" in one_error(distil_train("--config", str(tmp_path / "none.yaml")))


@pytest.mark.slow
def test_missing_shards(tmp_path):
    msg = one_error(distil_train("--config", "configs/tiny_cpu.yaml", f"data.shards={tmp_path / 'none'}",
                                 f"run.output_dir={tmp_path / 'run'}"))
    assert "manifest" in msg
    assert not (tmp_path / "run").exists()


def test_help_lists_the_options():
    p = distil_train("--help")
    assert p.returncode == 0 and "--resume" in p.stdout and "--config" in p.stdout
