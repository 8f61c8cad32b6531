#!/usr/bin/env bash
# One window of a recurring (scheduled) run: train until the window closes, checkpoint, and stop; the next
# window continues with --resume auto. Called by cron / a systemd timer (launch/distil.cron has the entries).
#   launch/scheduled.sh [--slurm] MINUTES CONFIG.yaml [key=value ...]
# MINUTES is the window's length. The run stops at the first update boundary past MINUTES - margin
# (run.time_limit_minutes; margin: DISTIL_WINDOW_MARGIN_MINUTES, default 10 % of the window, at least 1) so
# the checkpoint is written inside the window.
#   --slurm  submit the window as a SLURM job (sbatch launch/slurm.sbatch with --time=MINUTES, never
#            requeued); extra sbatch options in SBATCH_OPTIONS, e.g. SBATCH_OPTIONS="--nodes 2".
#   else     run on this node through launch/local.sh (NUM_GPUS as there) and exit with the trainer's status.
# Exit statuses (local): 0 finished (also: the run had already finished), 3 window over with more to do,
# 75 the previous window's run still holds run.output_dir; the others as docs/cluster.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# Python must not put the clone's root first on its path (`python -m` does): its kernels/ folder would
# shadow the installed `kernels` package. Safe-path mode, inherited by every process started below.
export PYTHONSAFEPATH=1
usage="usage: launch/scheduled.sh [--slurm] MINUTES CONFIG.yaml [key=value ...]"
slurm=0
if [[ "${1:-}" == "--slurm" ]]; then slurm=1; shift; fi
minutes="${1:?$usage}"; shift
config="${1:?$usage}"; shift
if ! [[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "error: MINUTES must be a number of minutes, got '$minutes' ($usage)" >&2; exit 2
fi
limit=$(python3 - "$minutes" "${DISTIL_WINDOW_MARGIN_MINUTES:-}" <<'PY'
import sys
window = float(sys.argv[1])
margin = float(sys.argv[2]) if sys.argv[2] else max(1.0, 0.1 * window)
if window - margin <= 0:
    sys.exit(f"error: a {window:g}-minute window leaves no training time after the {margin:g}-minute margin "
             "(set DISTIL_WINDOW_MARGIN_MINUTES lower or the window longer)")
print(f"{window - margin:g}")
PY
) || exit 2
if (( slurm )); then
  whole=$(python3 -c "import math, sys; print(max(1, math.ceil(float(sys.argv[1]))))" "$minutes")
  # shellcheck disable=SC2086  # SBATCH_OPTIONS is a list of options
  exec sbatch --time="$whole" --export=ALL,DISTIL_REQUEUE=0 ${SBATCH_OPTIONS:-} launch/slurm.sbatch "$config" \
    "run.time_limit_minutes=$limit" "$@"
fi
exec bash launch/local.sh "$config" "run.time_limit_minutes=$limit" "$@"
