#!/usr/bin/env bash
# Device session for the fused-loss kernels (about 5 minutes on one H200, inside the 15-minute budget):
#   1. the compiled Triton kernels against the torch implementation at V=30522 (pytest -k cuda),
#   2. benchmarks/bench_kernels.py: eager / torch.compile / ours / Liger at N = 4K, 16K, 64K, bf16,
#   3. ours at N = 16K with chunk sizes 512 and 8192 (the automatic choice there is 2048), tables in one file.
# Figures land in $OUT (the device tool's return folder) or /tmp/distil_kernels_gpu/.
#   bash benchmarks/run_kernels_gpu.sh
#   bash benchmarks/run_kernels_gpu.sh --cpu-smoke   # the same steps on CPU with tiny shapes (no GPU needed)
# Uses python3 from PATH (override with PYTHON=...). For the Liger-Kernel baseline, carry its wheel:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel
# and name .whl in the device call's carry list; it is installed into /tmp/site here.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/distil_kernels_gpu}"
py="${PYTHON:-python3}"
bench_args=(--device cuda --rows "${KERNELS_ROWS:-4096,16384,65536}")
sweep_args=(--device cuda --rows 16384 --methods ours)
sweep_chunks=(512 8192)
if [ "${1:-}" = "--cpu-smoke" ]; then
  bench_args=(--device cpu --tiny --methods eager,ours,liger --repeats 2)
  sweep_args=(--device cpu --tiny --rows 128 --methods ours --repeats 2)
  sweep_chunks=(32 64)
fi
. benchmarks/source_path.sh
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "${bench_args[1]}" = cuda ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: $py sees no CUDA device; run this on the GPU machine (or set PYTHON to its interpreter)" >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/kernels_gpu_device.txt"

"$py" -c "import pytest" 2>/dev/null || echo "pytest is not importable: carry its wheel (benchmarks/gpu_wheels.sh)"
timeout 180 "$py" -m pytest -q -p no:cacheprovider tests/kernels -k cuda -rs 2>&1 | tee "$out/kernels_cuda_tests.txt"
tests_rc=${PIPESTATUS[0]}

timeout 300 "$py" benchmarks/bench_kernels.py "${bench_args[@]}" \
  --out "$out/bench_kernels_gpu.json" --markdown "$out/bench_kernels_gpu.md" 2>&1 | tee "$out/bench_kernels_gpu.log"
bench_rc=${PIPESTATUS[0]}

: >"$out/bench_kernels_gpu_chunks.txt"
for chunk in "${sweep_chunks[@]}"; do
  echo "chunk size $chunk" >>"$out/bench_kernels_gpu_chunks.txt"
  timeout 120 "$py" benchmarks/bench_kernels.py "${sweep_args[@]}" --chunk-size "$chunk" \
    >>"$out/bench_kernels_gpu_chunks.txt" 2>&1 || bench_rc=1
done
cat "$out/bench_kernels_gpu_chunks.txt"

echo "cuda tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
