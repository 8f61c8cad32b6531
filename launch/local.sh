#!/usr/bin/env bash
# One node, every local GPU, through the DeepSpeed launcher. Resumes from the latest checkpoint if any.
#   launch/local.sh configs/distilbert_base_uncased.yaml data.shards=/data/wiki_books [key=value ...]
# NUM_GPUS=4 to use fewer GPUs (NUM_GPUS=1: one process, started without the launcher). On a CPU-only
# machine: DS_ACCELERATOR=cpu NUM_GPUS=2 (processes, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
# Python must not put the clone's root first on its path (`python -m` does): its kernels/ folder would
# shadow the installed `kernels` package. Safe-path mode, inherited by every process started below.
export PYTHONSAFEPATH=1
config="${1:?usage: launch/local.sh CONFIG.yaml [key=value ...]}"; shift
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
if [[ "$NUM_GPUS" == 1 ]]; then  # one process: the launcher would add only its start-up time
  exec python -m distil.pretrain.train --config "$config" --resume auto "$@"
fi
# The supervisor returns only once every rank has ended, with their status (143 after a stop with its
# checkpoint); a stop signal goes to the ranks, not to the launcher (pretrain/run/supervisor.py says why).
exec python -m distil.pretrain.run.supervisor -- deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module distil.pretrain.train --config "$config" --resume auto "$@"
