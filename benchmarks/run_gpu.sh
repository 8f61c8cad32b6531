#!/usr/bin/env bash
# The whole first GPU session as one command, under 8 minutes on one H200 (GPU time comes in short slots):
#   1. benchmarks/run_kernels_gpu.sh: the kernel tests on CUDA (compiled Triton, including the per-row
#      gradient checks under a loss scale, fp16 and bf16), then the fused-loss benchmark at N = 16K;
#   2. benchmarks/run_train_gpu.sh: training-step benchmarks (tiny fp32/bf16, BERT-base bf16), then the CLI
#      end to end: prepare, a BERT-base MLM teacher in bf16, its distillation in bf16 and in the recipe's fp16
#      (configs/distilbert_base_uncased.yaml: fp16 teacher, dynamic loss scale).
# Each part has its own time limit and a failing step is recorded while the rest go on; reports land in $OUT.
#   here, once:   bash benchmarks/gpu_wheels.sh          (.whl/: deepspeed, webdataset, pytest, ...)
#   device call:  carry [".whl"], command "bash benchmarks/run_gpu.sh", timeout_s 540
#   CPU smoke:    bash benchmarks/run_gpu.sh --cpu-smoke
set -uo pipefail
cd "$(dirname "$0")/.."
budget="${GPU_BUDGET_S:-470}"
started=$SECONDS
arg="${1:-}"
case "$arg" in
  "" | --cpu-smoke) ;;
  *) echo "error: unknown argument $arg; use no argument (GPU) or --cpu-smoke" >&2; exit 2 ;;
esac
KERNELS_ROWS="${KERNELS_ROWS:-16384}" timeout 200 bash benchmarks/run_kernels_gpu.sh $arg
kernels_rc=$?
left=$(( budget - (SECONDS - started) ))
TRAIN_GPU_BUDGET_S=$left timeout $(( left + 10 )) bash benchmarks/run_train_gpu.sh $arg
train_rc=$?
echo "run_gpu: kernels exit $kernels_rc, training exit $train_rc, $(( SECONDS - started ))s of ${budget}s"
[ "$kernels_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
