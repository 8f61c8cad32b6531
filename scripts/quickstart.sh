#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job on its embedded default: `distil quickstart`,
# the whole pipeline offline on a sample corpus (CPU is enough). Extra arguments go to `distil quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export TOKENIZERS_PARALLELISM=false
distil quickstart "$@"
