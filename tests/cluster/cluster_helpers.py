"""Shared pieces of the cluster tests: the environment, commands, tiny shards and teacher, file snapshots."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORDS = ("the a cat dog bird runs jumps sees big small red blue green house tree river quickly slowly over "
         "under near far and but").split()
# A tiny BERT for MLM-mode runs (no teacher needed) on top of the shipped CPU config.
TINY_MLM = ["--config", "configs/tiny_mlm_cpu.yaml", "model.hidden_size=32", "model.num_hidden_layers=2",
            "model.num_attention_heads=2", "model.intermediate_size=64", "data.batch_size=4",
            "data.shuffle_buffer=40", "tracking.enabled=false"]


def env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell with .venv active, in the clone's root: distil is the installed
    package (no PYTHONPATH), and no safe-path mode unless the launcher under test sets it itself."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    e.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PATH=f"{BIN}:{e.get('PATH', '')}")
    e.update(extra)
    return e


def run(cmd: list[str], *, expect: int | None = 0, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert p.returncode == expect, (f"{' '.join(cmd)} exited {p.returncode}, expected {expect}:\n"
                                        f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distil.pretrain.train", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def latest_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{out[-4000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time (ns)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def make_shards(root: Path, lines: int = 400) -> Path:
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 40))) + "." for _ in range(lines)]
    (root / "corpus.txt").write_text("\n".join(text) + "\n")
    run([str(BIN / "distil"), "prepare", "-i", str(root / "corpus.txt"), "-o", str(root / "shards"),
         "--train-tokenizer", "200", "--max-seq-len", "64", "--workers", "1", "--shard-size-mb", "0.02", "-q"])
    return root / "shards"


def make_teacher(shards: Path, out: Path) -> Path:
    """A randomly initialised 2-layer BERT masked LM with the shards' vocabulary and tokenizer (no training:
    the cluster tests check where runs stop and resume, not what the student learns)."""
    import shutil

    import torch
    from transformers import BertConfig, BertForMaskedLM

    manifest = json.loads((shards / "manifest.json").read_text())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=manifest["vocab_size"], hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pad_token_id=manifest["special_tokens"]["pad"])
    BertForMaskedLM(config).save_pretrained(out)
    for f in (shards / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def start_ranks(args: list[str], world: int, **extra_env: str) -> list[subprocess.Popen]:
    """`world` training processes started directly with the launchers' contract (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT): the cheapest multi-process run, for reference runs."""
    port = str(free_port())
    procs = [subprocess.Popen(train_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port, **extra_env))
             for r in range(world)]
    STARTED.extend(procs)
    return procs


STARTED: list[subprocess.Popen] = []  # every rank start_ranks started; tests/cluster/conftest.py ends leftovers


def kill_leftover_ranks() -> None:
    """Kills the ranks a test started and did not finish (it failed midway)."""
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=60)


def finish_ranks(procs: list[subprocess.Popen], timeout: int = 600, expect: int = 0) -> str:
    """Waits for every process; returns rank 0's output; every status must be `expect`."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=60)
    for r, p in enumerate(procs):
        assert p.returncode == expect, f"rank {r} exited {p.returncode}, expected {expect}:\n{outputs[r][-4000:]}"
    return outputs[0]


def same_weights(a: Path, b: Path) -> None:
    """The two exports hold bitwise equal tensors."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"
