#!/usr/bin/env bash
# Fetch into .whl/ the wheels the GPU machine lacks for the trainer (benchmarks/run_train_gpu.sh), for its
# Python 3.12 on manylinux x86_64 (/work/.library/device/README.md). Run here, in the repository root's
# .venv, where PyPI is reachable; the device call then names ".whl" in carry and the script installs them
# into /tmp/site. Versions are the ones installed in .venv, so both machines run the same packages.
#   bash benchmarks/gpu_wheels.sh          # -> .whl/*.whl and their total size
#
# The device image already has torch, triton, transformers, tokenizers, safetensors, numpy, pyyaml,
# click, tqdm, rich, pyarrow, matplotlib, psutil, packaging, einops, msgpack, ninja, py-cpuinfo,
# nvidia-ml-py (device KINDS.md). Missing there, and carried:
#   deepspeed (+ hjson, pydantic, pydantic-core, annotated-types, typing-inspection),
#   webdataset (+ braceexpand), omegaconf, zstandard, tenacity, typing-extensions (pydantic needs a recent one),
#   pytest (+ pluggy, iniconfig, pytest-timeout) for the kernel tests on CUDA.
# Left out: mlflow (tens of MiB with its dependencies): the GPU run sets tracking.enabled=false.
# deepspeed publishes no wheel: a pure-Python one is built here with DS_BUILD_OPS=0 (ops would be
# JIT-built at use; the trainer uses none: torch AdamW, no fused ops).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
dest=.whl
packages=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions pytest pluggy iniconfig pytest-timeout
          webdataset braceexpand omegaconf zstandard tenacity)

version_of() {  # the version installed in .venv, or fail
  "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" \
    || { echo "error: $1 is not installed in .venv ($py); run scripts/setup.sh first" >&2; exit 2; }
}

mkdir -p "$dest"
rm -f "$dest"/*.whl
pins=()
for name in "${packages[@]}"; do
  pins+=("$name==$(version_of "$name")")
done
echo "downloading: ${pins[*]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"

ds_version="$(version_of deepspeed)"
echo "building deepspeed==$ds_version (pure Python, DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir "deepspeed==$ds_version" \
  -w "$dest"
ds_wheel=$(ls "$dest"/deepspeed-"$ds_version"-*.whl)
case "$ds_wheel" in
  *-py3-none-any.whl) ;;
  *) echo "error: $ds_wheel is not a py3-none-any wheel; it would not install on the GPU machine" >&2; exit 1 ;;
esac

ls -l "$dest"/*.whl
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total: $(( total / 1024 / 1024 )) MiB ($total bytes) in $(ls "$dest"/*.whl | wc -l) wheels"
if [ "$total" -gt $(( 50 * 1024 * 1024 )) ]; then
  echo "warning: over 50 MiB; the working tree and .whl travel together under a 64 MiB limit" >&2
fi
