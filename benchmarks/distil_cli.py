"""Running the installed `distil` command from a benchmark: offline, its output kept for the error message, the
seconds it took on stderr. Imported by the benchmark scripts beside it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "distil"


def run_distil(args: list[str], label: str = "") -> float:
    """`distil ARGS...`; exits with its output's tail if it fails; returns the seconds it took."""
    started = time.perf_counter()
    p = subprocess.run([str(BIN), *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode != 0:
        sys.exit(f"distil {args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    print(f"  distil {args[0]} {label} ({seconds:.0f} s)", file=sys.stderr)
    return seconds
