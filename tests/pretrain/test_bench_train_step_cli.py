"""benchmarks/bench_train_step.py: the CPU path prints its table on tiny shapes; --device cuda without a GPU
is one error line; presets and the CUDA table's figures (peak memory, MFU) come out as documented."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench_train_step.py"
TINY = ["--vocab", "256", "--hidden", "32", "--heads", "4", "--teacher-layers", "2", "--student-layers", "1",
        "--batch", "4", "--seq", "24", "--steps", "1"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # a hang guard, not a speed check (18 s idle; over 180 s on a loaded box)


def test_cpu_tiny_prints_the_table():
    r = _run(TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    header = lines.index("| variant | wall s/step | tokens/s | speed-up | CPU s/step | speed-up by CPU time | last loss |")
    rows = lines[header + 2:header + 5]
    assert [row.split(" | ")[0] for row in rows] == [
        "| eager recipe step (reference)", "| ours, KL over all non-pad tokens", "| ours, restrict_ce_to_mask"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0
        assert math.isfinite(float(cells[-1]))  # last loss
    assert rows[0].split(" | ")[3] == "1.00x"
    assert lines[header - 1].startswith("batch 4 x seq <= 24,") and "student 1 layers" in lines[header - 1]
    assert sum(line.startswith("model FLOPs per step") for line in lines) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the no-GPU error cannot be shown")
def test_cuda_without_a_gpu_is_one_error_line():
    r = _run(["--device", "cuda", *TINY])
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda") and "no CUDA device" in err[0], r.stderr
    assert "| variant |" not in r.stdout


def test_presets_and_schedule_defaults():
    bench = _load_bench()
    base = bench.parse_args(["--preset", "base", "--device", "cuda"])
    assert (base.batch, base.seq, base.hidden, base.heads, base.teacher_layers) == (32, 128, 768, 12, 12)
    assert base.student_layers is None  # the trainer's rule: 6 layers [0, 2, 4, 7, 9, 11]
    assert (base.steps, base.warmup, base.schedule) == (20, 3, "sequential")
    tiny = bench.parse_args(["--hidden", "64"])
    assert (tiny.batch, tiny.hidden, tiny.teacher_layers, tiny.student_layers) == (16, 64, 4, 2)
    assert (tiny.steps, tiny.warmup, tiny.schedule, tiny.device, tiny.dtype) == (4, 1, "interleaved", "cpu", "fp32")
    with pytest.raises(SystemExit):
        bench.parse_args(["--hidden", "30", "--heads", "4"])


def test_cuda_table_reports_memory_and_mfu(capsys):
    bench = _load_bench()
    res = {bench.EAGER: {"wall": [2.0, 2.0], "peak_bytes": 3 * 2**30, "loss": 1.5},
           "ours, KL over all non-pad tokens": {"wall": [0.5], "peak_bytes": 2**30, "loss": 1.25}}
    flops = {bench.EAGER: 400e12, "ours, KL over all non-pad tokens": 100e12}
    bench.print_cuda_table(res, tokens=1000, base=2.0, flops=flops, peak_tflops=1000.0)
    out = capsys.readouterr().out.splitlines()
    assert out[2] == f"| {bench.EAGER} | 2.0000 | 500 | 1.00x | 3.00 | 200 | 20.0% | 1.500 |"
    assert out[3] == "| ours, KL over all non-pad tokens | 0.5000 | 2000 | 4.00x | 1.00 | 200 | 20.0% | 1.250 |"
    assert "ASSUMED peak of 1000 TFLOP/s" in out[4]
