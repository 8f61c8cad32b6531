#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_packages.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" TOKENIZERS_PARALLELISM=false
ruff check common pretrain kernels data_pipeline tests benchmarks
python -m pytest -q "$@"
