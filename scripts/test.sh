#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite on CPU, offline. Arguments go to pytest
# (e.g. -m "not slow" for the quick loop). VENV selects another environment; DISTIL_SKIP_SETUP=1 uses it as
# it is (scripts/refresh_lock.sh does, after installing the newest versions there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ "${DISTIL_SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
fi
bash scripts/system_packages.sh
. "$VENV/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" TOKENIZERS_PARALLELISM=false
ruff check common pretrain kernels data_pipeline tests benchmarks
# -P: pytest itself runs in safe-path mode (the clone's root is not put first on sys.path, where kernels/
# would shadow the installed `kernels` package); not exported, so the tests see how each launcher and
# subprocess guards itself. Two pytest workers (DISTIL_TEST_WORKERS; 0 for none), each test file in one
# of them (its module fixtures, such as the SLURM test cluster, made once); the slow files start first.
python -P -m pytest -q -n "${DISTIL_TEST_WORKERS:-2}" --dist loadfile "$@"
