#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher.
#   launch/hostfile.sh HOSTFILE configs/distilbert_base_uncased.yaml data.shards=/shared/wiki_books
# HOSTFILE lines: "node1 slots=8". The repository, its .venv, the shards and run.output_dir must be at the
# same paths on every node (a shared filesystem for checkpoints). MASTER_ADDR defaults to the first host,
# MASTER_PORT to 29500.
#
# Two ways to start it:
#   - from one node, which reaches every host by pdsh/ssh (the default);
#   - without ssh between nodes: run the same command on every node with NODE_RANK=i (0 on the first host
#     of the hostfile, which must be MASTER_ADDR): `NODE_RANK=1 launch/hostfile.sh HOSTFILE CONFIG ...`
#     (the launcher's --no_ssh --node_rank i). Each node then starts only its own processes.
set -euo pipefail
cd "$(dirname "$0")/.."
# Python must not put the clone's root first on its path (`python -m` does): its kernels/ folder would
# shadow the installed `kernels` package. Safe-path mode, inherited by every process started below.
export PYTHONSAFEPATH=1
usage="usage: [NODE_RANK=i] launch/hostfile.sh HOSTFILE CONFIG.yaml [key=value ...]"
hostfile="${1:?$usage}"; shift
config="${1:?$usage}"; shift
if [[ ! -f "$hostfile" ]]; then
  echo "error: hostfile $hostfile does not exist ($usage)" >&2; exit 2
fi
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
node_args=()
supervise=()
if [[ -n "${NODE_RANK:-}" ]]; then
  hosts=$(awk 'NF && $1 !~ /^#/' "$hostfile" | wc -l)
  if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= hosts )); then
    echo "error: NODE_RANK=$NODE_RANK must be a host's line number in $hostfile, from 0 to $((hosts - 1))" >&2
    exit 2
  fi
  node_args=(--no_ssh --node_rank "$NODE_RANK")
  # This node's ranks are this command's: it returns once they have ended, with their status (143 after a
  # stop with its checkpoint), and passes a stop signal to them (pretrain/run/supervisor.py). With ssh, the
  # launcher's own handling applies: docs/cluster.md.
  supervise=(python -m distil.pretrain.run.supervisor --)
fi
exec "${supervise[@]}" deepspeed --hostfile "$hostfile" "${node_args[@]}" --master_addr "$master" \
  --master_port "${MASTER_PORT:-29500}" --module distil.pretrain.train --config "$config" --resume auto "$@"
