"""benchmarks/bench_kernels.py runs end to end on CPU with tiny shapes and writes its figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_tiny_writes_json_and_markdown(tmp_path, capsys):
    bench = _load_bench()
    out, md = tmp_path / "figures.json", tmp_path / "figures.md"
    argv = ["--device", "cpu", "--tiny", "--rows", "48", "--methods", "eager,ours", "--warmup", "1"]
    assert bench.main([*argv, "--repeats", "1", "--out", str(out), "--markdown", str(md)]) == 0
    figures = json.loads(out.read_text())
    by_method = {r["method"]: r for r in figures["results"]}
    assert set(by_method) == {"eager", "ours"}
    for r in by_method.values():
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["peak_extra_mib"] >= 0
    # Same loss as the recipe's eager code on the same inputs.
    assert by_method["ours"]["loss_rel_diff_vs_eager"] < 1e-5
    assert figures["meta"]["vocab"] == 1021 and "memory_method" in figures["meta"]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| method | N |") and len(table) == 4
    assert "| ours | 48 |" in md.read_text()


def test_bench_refuses_bad_arguments(tmp_path):
    bench = _load_bench()
    with pytest.raises(SystemExit) as missing_dir:
        bench.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "nope" / "f.json")])
    assert missing_dir.value.code == 2
    with pytest.raises(SystemExit) as unknown:
        bench.main(["--device", "cpu", "--tiny", "--methods", "eager,fastest"])
    assert unknown.value.code == 2
    assert not any(tmp_path.iterdir())
