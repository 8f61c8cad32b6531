"""Times what CI runs (.ci/run) on a fresh clone, phase by phase, and prints a table.

    python benchmarks/bench_ci.py [--ref HEAD] [--keep]

Clones the repository's committed `--ref` into a temporary folder and runs there, as .ci/run does (CI=true):
set-up (scripts/setup.sh: a new .venv from the lock; pip's cache is whatever this machine has), the system
packages (scripts/system_packages.sh), the README's test command (scripts/test.sh, its set-up then a no-op),
and the README's quickstart command (scripts/quickstart.sh). Run it on an idle machine: every phase uses
both cores. The figures go to BENCHMARKS.md with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = [
    ("set-up (scripts/setup.sh)", ["bash", "scripts/setup.sh"]),
    ("system packages", ["bash", "scripts/system_packages.sh"]),
    ("tests (scripts/test.sh)", ["bash", "scripts/test.sh"]),
    ("quickstart (scripts/quickstart.sh)", ["bash", "scripts/quickstart.sh"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="the commit to clone (default HEAD)")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its logs are in ci-logs/)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distil-ci-"))
    clone = root / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", args.ref], cwd=clone, check=True)
    logs = clone / "ci-logs"
    logs.mkdir()
    env = {**os.environ, "CI": os.environ.get("CI", "true")}
    env.pop("VIRTUAL_ENV", None)
    rows = []
    total = 0.0
    try:
        for name, cmd in PHASES:
            log = logs / (re.sub(r"\W+", "_", name.split(" (")[0]) + ".log")
            started = time.perf_counter()
            with log.open("w") as handle:
                p = subprocess.run(cmd, cwd=clone, env=env, stdout=handle, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - started
            total += seconds
            rows.append((name, seconds, p.returncode, log))
            if p.returncode != 0:
                break
        summary = ""
        tests_log = logs / "tests.log"
        if tests_log.is_file():
            found = re.findall(r"=+ (.*(?:passed|failed).*) =+", tests_log.read_text())
            summary = found[-1] if found else ""
        print(f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=clone, capture_output=True, text=True).stdout.strip()}, "
              f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print("| phase | seconds | exit |\n|---|---|---|")
        for name, seconds, rc, _ in rows:
            print(f"| {name} | {seconds:.0f} | {rc} |")
        print(f"| **.ci/run in all** | **{total:.0f}** ({total / 60:.1f} min) | |")
        if summary:
            print(f"pytest: {summary}")
        if any(rc != 0 for *_, rc, _ in rows):
            failed = next(log for *_, rc, log in rows if rc != 0)
            print(f"a phase failed; its log: {failed}", file=sys.stderr)
            args.keep = True
            sys.exit(1)
    finally:
        if args.keep:
            print(f"clone kept: {clone}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
