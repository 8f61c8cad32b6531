#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (pdsh/ssh from this node to every host in the hostfile).
#   launch/hostfile.sh HOSTFILE configs/distilbert_base_uncased.yaml data.shards=/shared/wiki_books
# HOSTFILE lines: "node1 slots=8". The repository, its .venv, the shards and run.output_dir must be at the
# same paths on every node (a shared filesystem for checkpoints). MASTER_ADDR defaults to the first host.
set -euo pipefail
cd "$(dirname "$0")/.."
hostfile="${1:?usage: launch/hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]}"; shift
config="${1:?usage: launch/hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]}"; shift
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  --module distil.pretrain.train --config "$config" --resume auto "$@"
