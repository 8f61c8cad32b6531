#!/usr/bin/env bash
# Device session for the trainer (about 5 minutes on one H200; every step has a timeout and the whole run a
# budget, TRAIN_GPU_BUDGET_S, default 480 s, so it ends inside a 600 s device call):
#   1. benchmarks/bench_train_step.py --device cuda: eager recipe step vs ours (faithful KL, restrict_ce_to_mask)
#      for (tiny, fp32), (tiny, bf16), (base = BERT-base teacher / 6-layer student, bf16): tokens/s, peak GPU
#      memory, MFU against an assumed 989 TFLOP/s peak; all tables in one file;
#   2. end to end through the real CLI, single process on the GPU: sample corpus -> `distil prepare
#      --train-tokenizer` -> a BERT-base MLM teacher, 30 steps in bf16 (configs/bert_base_mlm.yaml) -> its
#      distillation, 30 steps in bf16 (configs/distilbert_bf16.yaml) -> metrics.jsonl tails;
#   3. if time is left: the base bf16 benchmark again with DISTIL_KERNELS_BACKEND=torch (the step without
#      the Triton kernels).
# Output (7 files) in $OUT (the device tool's return folder) or /tmp/distil_train_gpu/; work files in /tmp.
#   bash benchmarks/gpu_wheels.sh                  # here, once: .whl/ with deepspeed, webdataset, omegaconf, ...
#   device run: carry [".whl"], command "bash benchmarks/run_train_gpu.sh", timeout_s 600
#   bash benchmarks/run_train_gpu.sh --cpu-smoke   # the same steps on CPU with tiny shapes (no GPU needed)
# Uses python3 from PATH (override with PYTHON=...). MLflow tracking is on only where mlflow imports (the
# GPU image has none and gpu_wheels.sh does not carry it).
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
py="${PYTHON:-python3}"
smoke=0
case "${1:-}" in
  "") ;;
  --cpu-smoke) smoke=1 ;;
  *) echo "error: unknown argument $1; use no argument (GPU) or --cpu-smoke" >&2; exit 2 ;;
esac
if [ "$smoke" = 1 ]; then
  out="${OUT:-/tmp/distil_train_cpu_smoke}"
  work=/tmp/distil_train_cpu_smoke_work
  site=/tmp/distil_train_cpu_smoke_site
  export DS_ACCELERATOR=cpu
  device=cpu
  # Tiny shapes, few steps; the same dtypes, configs and CLI calls as on the GPU.
  bench_common=(--device cpu --vocab 512 --hidden 32 --heads 4 --teacher-layers 2 --student-layers 1 --batch 4
                --seq 32 --steps 1 --warmup 1 --schedule sequential)
  bench_base=(--device cpu --preset base --vocab 512 --hidden 48 --batch 4 --seq 32 --steps 1 --warmup 1
              --schedule sequential)
  corpus_bytes=200000 vocab=600 steps=4 log_every=2
  teacher_arch=(model.hidden_size=32 model.num_hidden_layers=2 model.num_attention_heads=4 model.intermediate_size=64
                data.batch_size=4 data.num_workers=0)
  student_extra=(data.batch_size=4 data.num_workers=0)
else
  out="${OUT:-/tmp/distil_train_gpu}"
  work=/tmp/distil_train_gpu_work
  site=/tmp/site
  unset DS_ACCELERATOR  # DeepSpeed detects CUDA
  device=cuda
  bench_common=(--device cuda --preset tiny)
  bench_base=(--device cuda --preset base)
  corpus_bytes=3000000 vocab=8000 steps=30 log_every=5
  teacher_arch=(data.batch_size=32)
  student_extra=(data.batch_size=32)
fi
budget="${TRAIN_GPU_BUDGET_S:-480}"  # seconds for the whole script, wheel install included
started=$SECONDS
. benchmarks/source_path.sh
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
rm -rf "$work" && mkdir -p "$work"
summary="$out/train_gpu_summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

# Carried wheels: all of them on the GPU machine (Python 3.12); in the smoke run only the pure-Python ones
# (the compiled ones are for 3.12), installed ahead of this environment's copies so they are what runs.
if compgen -G ".whl/*.whl" >/dev/null; then
  if [ "$smoke" = 1 ]; then wheels=(.whl/*-none-any.whl); else wheels=(.whl/*.whl); fi
  rm -rf "$site"
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}"; then
    export PYTHONPATH="$distil_src:$site${PYTHONPATH#"$distil_src"}"
    note "installed ${#wheels[@]} carried wheels into $site"
  else
    note "error: installing the carried wheels failed"
    exit 2
  fi
else
  note "no .whl/ folder: using the packages already installed (run benchmarks/gpu_wheels.sh first for the GPU)"
fi
if [ "$device" = cuda ] && ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: $py sees no CUDA device; run this on the GPU machine (or --cpu-smoke here)" >&2
  exit 2
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$py" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "deepspeed", "transformers", "tokenizers", "triton", "webdataset", "omegaconf", "pydantic"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:  # report and carry on: the step that needs it fails visibly
        print(f"{name}: NOT IMPORTABLE ({type(e).__name__}: {e})")
import torch
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF
} 2>&1 | tee "$out/train_gpu_device.txt"

if "$py" -c "import mlflow" 2>/dev/null; then
  tracking=("tracking.tracking_uri=sqlite:///$work/mlflow.db")
  note "mlflow importable: tracking into $work/mlflow.db"
else
  tracking=(tracking.enabled=false)
  note "mlflow not importable: tracking.enabled=false"
fi

failures=0
# run_step NAME LIMIT_S LOGFILE CMD...: runs CMD under `timeout`, never past the run's budget; appends to LOGFILE.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$(( budget - (SECONDS - started) ))
  if [ "$left" -lt 20 ]; then
    note "SKIPPED $name: ${left}s of the ${budget}s budget left"
    failures=$((failures + 1))
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$SECONDS
  echo "\$ $*" >>"$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  note "$name: exit $rc in $(( SECONDS - t0 ))s (limit ${limit}s)"
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
  return "$rc"
}

bench_md="$out/bench_train_gpu.md"
: >"$bench_md"
bench_env=()  # e.g. (env DISTIL_KERNELS_BACKEND=torch): a prefix for the next bench calls
bench() {  # bench NAME LIMIT ARGS...
  local name=$1 limit=$2
  shift 2
  printf '\n## %s\n\n' "$name" >>"$bench_md"
  run_step "bench $name" "$limit" "$bench_md" "${bench_env[@]}" "$py" benchmarks/bench_train_step.py "$@"
}
bench "tiny fp32" 90 "${bench_common[@]}" --dtype fp32
bench "tiny bf16" 90 "${bench_common[@]}" --dtype bf16
bench "base bf16" 150 "${bench_base[@]}" --dtype bf16

# End to end through the CLI.
corpus="$work/corpus.txt" shards="$work/shards" teacher="$work/teacher" student="$work/student"
run_step "sample corpus" 60 "$out/e2e_prepare.log" "$py" -c \
  "import sys; from distil.data_pipeline.prepare.sample_corpus import write_sample_corpus as w; print(w(sys.argv[1], max_bytes=int(sys.argv[2])), 'paragraphs')" \
  "$corpus" "$corpus_bytes"
run_step "prepare" 120 "$out/e2e_prepare.log" "$py" -m distil.pretrain.cli prepare --input "$corpus" --output "$shards" \
  --train-tokenizer "$vocab" --max-seq-len 128 --holdout-fraction 0.02 --pack -q
common=(run.max_steps="$steps" run.log_every="$log_every" checkpoint.every=0 engine.gradient_accumulation_steps=1
        "${tracking[@]}")
run_step "teacher MLM bf16" 150 "$out/e2e_teacher.log" "$py" -m distil.pretrain.train --config configs/bert_base_mlm.yaml \
  data.shards="$shards" run.output_dir="$teacher" "${common[@]}" "${teacher_arch[@]}"
run_step "student distillation bf16" 150 "$out/e2e_student.log" "$py" -m distil.pretrain.train \
  --config configs/distilbert_bf16.yaml data.shards="$shards" teacher.path="$teacher/export" \
  run.output_dir="$student" engine.global_batch_size=null "${common[@]}" "${student_extra[@]}"
if [ "$device" = cuda ]; then  # the recipe's fp16 path: fp16 teacher, fp16 student under a dynamic loss scale
  run_step "student distillation fp16" 150 "$out/e2e_student_fp16.log" "$py" -m distil.pretrain.train \
    --config configs/distilbert_base_uncased.yaml data.shards="$shards" teacher.path="$teacher/export" \
    run.output_dir="$student-fp16" engine.global_batch_size=null "${common[@]}" "${student_extra[@]}"
fi
{
  for run in "$teacher" "$student" "$student-fp16"; do
    [ -d "$run" ] || continue
    echo "== $run/metrics.jsonl (last 4 lines of $(wc -l <"$run/metrics.jsonl" 2>/dev/null || echo 0))"
    tail -n 4 "$run/metrics.jsonl" 2>&1
    echo "== $run/export"
    ls -l "$run/export" 2>&1
  done
} | tee "$out/e2e_metrics.txt"
for run in "$teacher" "$student"; do
  [ -s "$run/metrics.jsonl" ] && [ -f "$run/export/config.json" ] || { note "missing metrics or export in $run"; failures=$((failures + 1)); }
done

# Lowest priority, only if the budget allows (not a failure when skipped): the same base step with the
# torch loss instead of the Triton kernels.
if [ $(( budget - (SECONDS - started) )) -ge 90 ]; then
  bench_env=(env DISTIL_KERNELS_BACKEND=torch)
  bench "base bf16, DISTIL_KERNELS_BACKEND=torch" 120 "${bench_base[@]}" --dtype bf16
else
  note "skipped the optional base bf16 run with DISTIL_KERNELS_BACKEND=torch: under 90s of the budget left"
fi

note "total $(( SECONDS - started ))s of the ${budget}s budget; $failures step(s) failed or skipped"
[ "$failures" -eq 0 ]
