#!/usr/bin/env bash
# torchrun instead of the DeepSpeed launcher. One node:
#   launch/torchrun.sh configs/distilbert_base_uncased.yaml data.shards=/data/wiki_books
# Several nodes (run this same command on every node):
#   NNODES=4 RDZV_ENDPOINT=node1:29500 launch/torchrun.sh CONFIG.yaml ...
set -euo pipefail
cd "$(dirname "$0")/.."
# Python must not put the clone's root first on its path (`python -m` does): its kernels/ folder would
# shadow the installed `kernels` package. Safe-path mode, inherited by every process started below.
export PYTHONSAFEPATH=1
config="${1:?usage: launch/torchrun.sh CONFIG.yaml [key=value ...]}"; shift
nproc="${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}"
# The supervisor returns only once every rank has ended, with their status (143 after a stop with its
# checkpoint; torchrun alone reports 1 and kills slow ranks 30 s after a signal): pretrain/run/supervisor.py.
supervise=(python -m distil.pretrain.run.supervisor --)
if [[ "${NNODES:-1}" == 1 ]]; then
  exec "${supervise[@]}" torchrun --standalone --nproc_per_node "$nproc" -m distil.pretrain.train --config "$config" --resume auto "$@"
fi
exec "${supervise[@]}" torchrun --nnodes "$NNODES" --nproc_per_node "$nproc" --rdzv_backend c10d \
  --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}" --rdzv_id "${RDZV_ID:-distil}" \
  -m distil.pretrain.train --config "$config" --resume auto "$@"
