#!/usr/bin/env bash
# Creates the virtual environment (.venv at the repository root, or $VENV) and installs distil with its test
# tools at the versions in requirements.lock: the ones the suite last passed with (its header says when).
#   DISTIL_UNLOCKED=1  install the newest versions pyproject.toml's ranges allow instead (what
#                      scripts/refresh_lock.sh does before it tests them and rewrites the lock).
# torch goes in first: the CPU build (a local file on the dev machines) when there is no NVIDIA GPU, so that
# nothing later pulls a multi-GB CUDA build. torch is not in the lock (its build depends on the machine);
# where torch's CUDA build brought its own triton, that one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
LOCK=requirements.lock
TORCH="torch==2.13.0"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
# Without a GPU, DeepSpeed runs on its CPU accelerator, whose collectives op is compiled on first use (about a
# minute): it is built here, once per environment, instead of inside the first run or test.
build_cpu_op() {
  has_gpu && return 0
  if ! DS_ACCELERATOR=cpu python -P -c "from distil.pretrain.cpu_collectives import load_op; load_op()" >/dev/null; then
    echo "error: building DeepSpeed's CPU collectives op failed (see above); it needs a C++ compiler and ninja (apt install g++)" >&2
    exit 1
  fi
}
if ! python -c "import torch" 2>/dev/null; then
  if has_gpu; then
    python -m pip install --quiet "$TORCH" || python -m pip install --quiet torch
  else
    python -m pip install --quiet "$TORCH"
  fi
fi
if [ "${DISTIL_UNLOCKED:-0}" = 1 ]; then
  python -m pip install --quiet --upgrade pip setuptools
  # Everything to the newest the ranges allow, but the torch installed above (an upgrade would be another
  # build: on a machine without a GPU, PyPI's newest torch is the multi-GB CUDA one).
  keep_torch=$(mktemp)
  python -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
  python -m pip install --quiet --upgrade --upgrade-strategy eager -c "$keep_torch" -e ".[test,export]"
  rm -f "$keep_torch"
  build_cpu_op
  exit 0
fi
if [ ! -f "$LOCK" ]; then
  echo "error: $LOCK is missing; restore it from git or run with DISTIL_UNLOCKED=1" >&2
  exit 2
fi
pinned=$(mktemp)
trap 'rm -f "$pinned"' EXIT
# A triton that came with torch (CUDA builds pin their own) stays; the lock's triton is the CPU machines'.
if python -m pip show --quiet triton >/dev/null 2>&1 && python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
  grep -viE '^triton==' "$LOCK" > "$pinned"
else
  cp "$LOCK" "$pinned"
fi
python -m pip install --quiet "$(grep -iE '^pip==' "$pinned")"
# Every package pinned, transitive ones included: --no-deps installs exactly the lock, and `pip check` below
# fails if the lock lacks something a package needs. distil itself is built with the locked setuptools.
python -m pip install --quiet --no-deps -r "$pinned"
python -m pip install --quiet --no-deps --no-build-isolation -e ".[test,export]"
if ! python -m pip check >/dev/null; then
  python -m pip check >&2 || true
  echo "error: the environment in $VENV does not satisfy distil's requirements with $LOCK; run scripts/refresh_lock.sh (or DISTIL_UNLOCKED=1 bash scripts/setup.sh)" >&2
  exit 1
fi
build_cpu_op
