#!/usr/bin/env bash
# Installs the system software the test suite drives for real, where apt-get can (Debian/Ubuntu, as root):
#   chromium                                  headless browser: the MLflow UI as a user sees it
#   slurmctld slurmd slurm-client munge       a one-host SLURM cluster: launch/slurm.sbatch, preemption, requeue
# A failed apt-get install exits non-zero. Without apt-get or root it installs nothing and says so (the tests
# that need a missing program then skip with that reason), except in CI (CI set), where that is a failure too.
set -uo pipefail
PACKAGES=(chromium slurmctld slurmd slurm-client munge)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  if [ -n "${CI:-}" ]; then
    echo "error: system_packages: cannot install ${missing[*]} (needs apt-get as root), and CI requires them" >&2
    exit 1
  fi
  echo "system_packages: not installing ${missing[*]} (needs apt-get as root); the tests that use them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "error: system_packages: apt-get could not install ${missing[*]}" >&2
  exit 1
fi
# The packages' own services are not wanted: the tests start private daemons with their own configs.
for service in slurmctld slurmd munge; do
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$service" >/dev/null 2>&1 || true; fi
done
exit 0
