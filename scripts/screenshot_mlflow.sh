#!/usr/bin/env bash
# The screenshot in docs/tracking.md: a real quickstart experiment in the MLflow UI, as a user opens it.
#
#   scripts/screenshot_mlflow.sh [--quickstart DIR] [--output PNG]
#
# Runs `distil quickstart --output DIR` when DIR holds no quickstart store yet (about two minutes on 2 CPU
# cores; default DIR: a temporary folder, removed afterwards), serves its store with launch/mlflow_server.sh
# on a free 127.0.0.1 port, opens the experiment link that `distil review` prints in headless Chromium and
# writes the runs table as a small PNG (default docs/images/mlflow_quickstart_runs.png). Offline.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

quickstart=""
output="docs/images/mlflow_quickstart_runs.png"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quickstart) quickstart="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (use --quickstart, --output)" >&2; exit 2 ;;
  esac
done
chromium="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$chromium" ]]; then
  echo "error: chromium is not installed (scripts/system_packages.sh installs it where apt-get runs as root)" >&2
  exit 2
fi
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill -- "-$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
if [[ -z "$quickstart" ]]; then
  quickstart="$work/quickstart"
fi
if [[ ! -f "$quickstart/mlflow.db" ]]; then
  distil quickstart --output "$quickstart"
fi
quickstart="$(cd "$quickstart" && pwd)"

port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
setsid bash launch/mlflow_server.sh --port "$port" --dir "$quickstart" >"$work/server.log" 2>&1 &
server_pid=$!
python - "$port" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2):
            sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("error: the MLflow server did not answer within 180 s")
EOF

link="$(distil review --experiment quickstart --tracking-uri "http://127.0.0.1:$port" --output "$work/cmp.png" \
  | sed -n 's/^in the MLflow UI: //p')"
echo "experiment link: $link" >&2
# The UI keeps its assistant panel on the right (a quarter of the window): the PNG leaves it out.
"$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --user-data-dir="$work/profile" --virtual-time-budget=30000 --window-size=1800,470 \
  --screenshot="$work/full.png" "$link" 2>/dev/null
mkdir -p "$(dirname "$output")"
python - "$work/full.png" "$output" <<'EOF'
import sys
from PIL import Image

image = Image.open(sys.argv[1]).convert("RGB")
width, height = image.size
runs = image.crop((0, 0, int(width * 0.74), height))
runs.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
print(f"wrote {sys.argv[2]} ({runs.size[0]}x{runs.size[1]})", file=sys.stderr)
EOF
echo "done: $repo/$output" >&2
