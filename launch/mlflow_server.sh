#!/usr/bin/env bash
# Starts an MLflow tracking server for distil runs, with a SQLite backend store and a local artifact root
# (artifacts are proxied through the server, so clients need no access to the folder).
#
#   launch/mlflow_server.sh [--port 5000] [--dir ./mlflow-server] [--workers 1]
#       One person's server, bound to 127.0.0.1 only. Point training at it with
#       tracking.tracking_uri=http://127.0.0.1:5000 (or MLFLOW_TRACKING_URI); other nodes reach it through an
#       SSH tunnel (ssh -N -L 5000:127.0.0.1:5000 <this host>); only global rank 0 talks to it anyway.
#
#   launch/mlflow_server.sh --team [--host 0.0.0.0] [--admin-password-file FILE] [--default-permission READ]
#       A team's server: MLflow's basic-auth app, every request needs a user's name and password, each
#       experiment has its permissions (its creator manages it; others get --default-permission: READ, EDIT,
#       MANAGE or NO_PERMISSIONS). On its first start it creates the admin user (MLFLOW_AUTH_ADMIN_USERNAME,
#       default admin) with the password read from FILE or from MLFLOW_AUTH_ADMIN_PASSWORD, never from the
#       command line; later starts keep the accounts in <dir>/basic_auth.db. Binds 0.0.0.0 unless --host says
#       otherwise; it speaks plain HTTP, so put TLS in front of it (a reverse proxy, docs/tracking.md).
#       Accounts: distil tracking-user --help.
set -euo pipefail

port=5000
dir=./mlflow-server
workers=1
team=0
host=""
password_file=""
default_permission=READ
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --team) team=1; shift ;;
    --host) host="$2"; shift 2 ;;
    --admin-password-file) password_file="$2"; shift 2 ;;
    --default-permission) default_permission="$2"; shift 2 ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (use --port, --dir, --workers, --team, --host, --admin-password-file, --default-permission)" >&2; exit 2 ;;
  esac
done
if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  echo "error: --port must be a number from 1 to 65535, got '$port'" >&2; exit 2
fi
if ! command -v mlflow >/dev/null 2>&1; then
  echo "error: mlflow is not on PATH; activate the project's environment (. .venv/bin/activate)" >&2; exit 2
fi
if [[ "$team" == 0 && ( -n "$host" || -n "$password_file" ) ]]; then
  echo "error: --host and --admin-password-file are for a team server: add --team (without it the server binds 127.0.0.1 and has no accounts)" >&2
  exit 2
fi

mkdir -p "$dir/mlartifacts"
dir="$(cd "$dir" && pwd)"
# MLflow's job runner (GenAI evaluation jobs) is not needed for training runs and costs several processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
args=(--port "$port" --workers "$workers" --backend-store-uri "sqlite:///$dir/mlflow.db"
      --artifacts-destination "$dir/mlartifacts")
if [[ "$team" == 1 ]]; then
  host="${host:-0.0.0.0}"
  case "$default_permission" in
    READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
    *) echo "error: --default-permission must be READ, EDIT, MANAGE or NO_PERMISSIONS, got '$default_permission'" >&2; exit 2 ;;
  esac
  if [[ -n "$password_file" ]]; then
    if [[ ! -r "$password_file" ]]; then
      echo "error: --admin-password-file $password_file cannot be read" >&2; exit 2
    fi
    MLFLOW_AUTH_ADMIN_PASSWORD="$(head -n 1 "$password_file")"
    export MLFLOW_AUTH_ADMIN_PASSWORD
  fi
  if [[ ! -s "$dir/basic_auth.db" ]]; then
    if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
      echo "error: a new team server needs the admin's password: --admin-password-file FILE or MLFLOW_AUTH_ADMIN_PASSWORD" >&2
      exit 2
    fi
    if (( ${#MLFLOW_AUTH_ADMIN_PASSWORD} < 12 )); then  # MLflow's own rule, said before it starts
      echo "error: the admin's password must have at least 12 characters (MLflow refuses shorter ones)" >&2
      exit 2
    fi
  fi
  # The auth app's settings: its own user store beside the tracking store; nothing secret is written here.
  umask 077
  cat > "$dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = $default_permission
database_uri = sqlite:///$dir/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini"
  # The key that signs the UI's CSRF tokens: made once, kept beside the store (readable by its owner only) so
  # that restarts and every worker agree on it; MLFLOW_FLASK_SERVER_SECRET_KEY, if set, is used instead.
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    if [[ ! -s "$dir/flask_secret_key" ]]; then
      python -c "import secrets; print(secrets.token_hex(32))" > "$dir/flask_secret_key"
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$dir/flask_secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
  echo "mlflow team server: http://$host:$port (accounts: $dir/basic_auth.db; plain HTTP: put TLS in front)" >&2
else
  host=127.0.0.1
  echo "mlflow server: http://127.0.0.1:$port  store: $dir/mlflow.db  artifacts: $dir/mlartifacts" >&2
fi
# MLflow 3's UI opens on its GenAI view; this link (and every one distil prints) opens the model-training view.
echo "experiments: http://$host:$port/#/experiments?workflowType=machine_learning" >&2
exec mlflow server --host "$host" "${args[@]}"
