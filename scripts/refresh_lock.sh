#!/usr/bin/env bash
# Refreshes requirements.lock to the newest versions pyproject.toml's ranges allow, and keeps the new lock
# only if the whole test suite passes with them:
#   bash scripts/refresh_lock.sh [pytest arguments]
# It builds a separate environment (.venv-refresh; .venv is not touched), installs the newest versions there
# (DISTIL_UNLOCKED=1 bash scripts/setup.sh), runs the README's test command against it, and on success writes
# requirements.lock with a header saying when, on which Python and with which torch. Review the diff and
# commit it: an upstream release then reaches users as a change that was tested, not as a surprise.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv-refresh}"
rm -rf "$VENV"
DISTIL_UNLOCKED=1 bash scripts/setup.sh
DISTIL_SKIP_SETUP=1 bash scripts/test.sh "$@"
. "$VENV/bin/activate"
new=$(mktemp)
{
  echo "# distil's locked environment: every package scripts/setup.sh installs, transitive ones included."
  if [ $# -eq 0 ]; then
    echo "# Refreshed $(date -u +%Y-%m-%d) by scripts/refresh_lock.sh (the whole suite passed with these versions)"
  else
    echo "# Refreshed $(date -u +%Y-%m-%d) by scripts/refresh_lock.sh (the suite passed with pytest arguments: $*)"
  fi
  echo "# on $(python -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")'),"
  echo "# with torch $(python -c 'import torch; print(torch.__version__)') installed first (torch is not locked: its build depends on the machine)."
  python -m pip freeze --all --exclude-editable | grep -viE '^(torch|distil)==' | LC_ALL=C sort -f
} > "$new"
mv "$new" requirements.lock
echo "requirements.lock refreshed; review with: git diff requirements.lock"
