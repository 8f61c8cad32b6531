"""What the end-to-end training tests share: a user's environment in the clone's root, a command that must
succeed, a free port, and a tiny shard set made with `distil prepare` from generated sentences."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORDS = ("the a cat dog bird runs jumps sees big small red blue green house tree river quickly slowly over "
         "under near far and but").split()


def env() -> dict[str, str]:
    # A user's shell in the clone's root: distil as installed, no PYTHONPATH, no safe-path mode of our own.
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    e.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1")
    return e


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(root: Path) -> Path:
    """800 generated sentences through `distil prepare` (a 1000-token tokenizer trained on them)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 40))) + "." for _ in range(800)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    run([str(BIN / "distil"), "prepare", "-i", str(root / "corpus.txt"), "-o", str(root / "shards"),
         "--train-tokenizer", "1000", "--max-seq-len", "64", "--workers", "1", "--shard-size-mb", "0.05", "-q"])
    return root / "shards"


def run_as_launched_rank(code: str, timeout: int = 240) -> str:
    """`python -P -c code` as the DeepSpeed launcher starts the one rank of a one-process job (LOCAL_SIZE set,
    so DeepSpeed's CPU op makes its /dev/shm segment); it must succeed; returns its last output line."""
    e = env()
    e.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
             MASTER_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def sigkill_after_checkpoint(proc, out: Path, step: int, timeout: float = 300) -> str:
    """SIGKILL the whole process group of `proc` (a launch started with start_new_session=True: launcher and
    ranks) once `out`'s checkpoints/latest names step `step` or later; returns the newest checkpoint then."""
    import os
    import signal
    import time

    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (latest.is_file() and latest.read_text().strip() >= f"step_{step:08d}"):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return latest.read_text().strip()
