#!/usr/bin/env bash
# Starts an MLflow tracking server for distil runs, bound to 127.0.0.1 only, with a SQLite backend store and a
# local artifact root (artifacts are proxied through the server, so clients need no access to the folder).
#
#   launch/mlflow_server.sh [--port 5000] [--dir ./mlflow-server] [--workers 1]
#
# Then point training at it: `distil train ... tracking.tracking_uri=http://127.0.0.1:5000` (or export
# MLFLOW_TRACKING_URI). Nodes other than this host reach it through an SSH tunnel
# (ssh -N -L 5000:127.0.0.1:5000 <this host>); only global rank 0 talks to it anyway.
set -euo pipefail

port=5000
dir=./mlflow-server
workers=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (use --port, --dir, --workers)" >&2; exit 2 ;;
  esac
done
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  echo "error: --port must be a number from 1 to 65535, got '$port'" >&2; exit 2
fi
if ! command -v mlflow >/dev/null 2>&1; then
  echo "error: mlflow is not on PATH; activate the project's environment (. .venv/bin/activate)" >&2; exit 2
fi

mkdir -p "$dir/mlartifacts"
dir="$(cd "$dir" && pwd)"
# MLflow's job runner (GenAI evaluation jobs) is not needed for training runs and costs several processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "mlflow server: http://127.0.0.1:$port  store: $dir/mlflow.db  artifacts: $dir/mlartifacts" >&2
# MLflow 3's UI opens on its GenAI view; this link (and every one distil prints) opens the model-training view.
echo "experiments: http://127.0.0.1:$port/#/experiments?workflowType=machine_learning" >&2
exec mlflow server \
  --host 127.0.0.1 \
  --port "$port" \
  --workers "$workers" \
  --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --artifacts-destination "$dir/mlartifacts"
