#!/usr/bin/env bash
# The GPU check: install the carried wheels, run the test suite (.ci/gpu_tests.sh when present, up to ~5 minutes
# by its own budget), then the benchmarks of the product's own path against Keras 3 with small GPU flags (~9
# minutes on an H100 at most, by their limits), most wanted first (head, fine-tuning, robustness, compiled
# fine-tuning, extraction), each under its own timeout and writing its JSON into $OUT as rows finish, then one
# summary. Where one command may run at most 10 minutes, run it as two: --tests-only, then --skip-tests, or
# --bench-first: the benchmarks, then the tests until GPU_TEST_BUDGET (default 585) seconds from the start.
#
#   bash benchmarks/gpu.sh [--skip-tests | --tests-only | --bench-first]  # on the GPU machine (carry .whl/)
#   bash benchmarks/gpu.sh --cpu                           # the same script end to end with tiny flags on a CPU
#
# Files in $OUT (default ./bench-out): gpu_tests.log and gpu_tests_outcomes.log (tests), head.json, finetune.json,
# robustness.json, finetune_compiled.json (ours with model.compile_backbone true, no Keras: compare with
# finetune.json's Keras rows of the same run), extract.json, bench.log (every benchmark's full output), summary.md.
# Benchmark time limits (seconds) can be set from the environment: EXTRACT_TIMEOUT HEAD_TIMEOUT FINETUNE_TIMEOUT
# FINETUNE_COMPILED_TIMEOUT ROBUSTNESS_TIMEOUT;
# GPU_TEST_ARGS passes pytest arguments to the tests (e.g. "--ignore tests/test_parity.py" on a short lease).
# The GPU machine has no TensorFlow: the Keras reference there is Keras-JAX (mixed_bfloat16 where ours runs bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu TESTS=1 BENCH=1 FIRST=tests
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu TESTS=0 ;;  # the CPU suite is CI's job; add --tests after --cpu to run it anyway
    --tests) TESTS=1 ;;
    --skip-tests) TESTS=0 ;;
    --tests-only) BENCH=0 ;;
    --bench-first) FIRST=bench ;;
    *) echo "unknown argument $arg (use --cpu, --tests, --skip-tests, --tests-only, --bench-first)"; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 1; }
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 - <<'EOF'
from importlib import metadata  # versions without importing (TensorFlow and torch must not share a process)
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("keras", "jax", "jaxlib", "tensorflow", "tensorflow-cpu", "timm", "pytorch-lightning", "kornia", "jsonargparse"):
    try:
        print(f"  {m} {metadata.version(m)}")
    except metadata.PackageNotFoundError:
        pass
EOF

# the test suite (.ci/gpu_tests.sh: its own log files in $OUT and its own time budget, GPU_TEST_BUDGET)
run_tests() {  # --bench-first: GPU_TEST_BUDGET counts from the script's start (default: a 10-minute command's 585)
  local budget=${GPU_TEST_BUDGET:-285}
  [[ $FIRST == bench ]] && budget=$(( ${GPU_TEST_BUDGET:-585} - $(elapsed) ))
  if (( budget < 30 )); then echo "== tests: no time left in GPU_TEST_BUDGET"; return; fi
  echo "== tests: bash .ci/gpu_tests.sh (budget $budget s)"
  # shellcheck disable=SC2086
  GPU_TEST_BUDGET=$budget OUT=$OUT bash .ci/gpu_tests.sh ${GPU_TEST_ARGS:-} 2>&1 \
    | grep -E "passed|failed|error|FAILED|ERROR|exit code|workers|cpus" | tail -40
  echo "tests done ($(elapsed) s so far)"
}
if [[ $TESTS == 1 && ! -f .ci/gpu_tests.sh ]]; then
  echo "== no .ci/gpu_tests.sh: tests skipped"; TESTS=0
fi
[[ $TESTS == 1 && $FIRST == tests ]] && run_tests
[[ $BENCH == 0 ]] && exit 0

# 2. the benchmarks: flags per mode (see each script's --help); each row lands in $OUT/<name>.json as it finishes
if [[ $MODE == gpu ]]; then
  # few models: each costs a Keras-JAX XLA compilation and ours' warm-up / compilation (~20-60 s on an H100)
  HEAD="--rows 50000 --epochs 3"
  FINETUNE="--models ResNet50 InceptionV3 --steps 30 --batch 64"
  ROBUSTNESS="--models ResNet50 --n-images 512 --batch 64 --corruptions gaussian_noise defocus_blur"
  FINETUNE_COMPILED="--models ResNet50 --steps 30 --batch 64 --compile-backbone true --keras"
  # --profile-batches: where the host's and the device's time goes in 2 of the val split's batches (the 11-27 run
  # spent 55 % of ResNet50's extraction outside the model, unexplained)
  EXTRACT="--models ResNet50 VGG16 --n-images 2048 --warmup-batches 3 --profile-batches 2"
  # limits from the H100 run of 2026-11-27 (head 29 s, fine-tuning 190 s, robustness 89 s; the compiled fine-tuning
  # compiles forward and backward, and Xception's extraction did not finish in 90 s after ResNet50's)
  T_HEAD=${HEAD_TIMEOUT:-60}; T_FT=${FINETUNE_TIMEOUT:-190}; T_ROB=${ROBUSTNESS_TIMEOUT:-95}
  T_FTC=${FINETUNE_COMPILED_TIMEOUT:-130}; T_EXTRACT=${EXTRACT_TIMEOUT:-100}
else
  HEAD="--rows 2000 --epochs 2"
  FINETUNE="--models ResNet50 --steps 2 --batch 4"
  ROBUSTNESS="--models ResNet50 --n-images 8 --batch 4 --corruptions gaussian_noise"
  FINETUNE_COMPILED="--models ResNet50 --steps 2 --batch 4 --compile-backbone false --keras"
  EXTRACT="--models ResNet50 --n-images 100 --batch 4 --profile-batches 1"
  T_HEAD=${HEAD_TIMEOUT:-400}; T_FT=${FINETUNE_TIMEOUT:-900}; T_ROB=${ROBUSTNESS_TIMEOUT:-900}
  T_FTC=${FINETUNE_COMPILED_TIMEOUT:-600}; T_EXTRACT=${EXTRACT_TIMEOUT:-900}
fi

bench() {  # name, time limit, flags... (JSON_NAME: the JSON file's name, default the benchmark's)
  local name=$1 limit=$2 json=${JSON_NAME:-$1}
  shift 2
  echo "== $name (limit $limit s, $(elapsed) s so far): python3 benchmarks/$name.py $* --json \$OUT/$json.json"
  timeout -k 15 "$limit" python3 "benchmarks/$name.py" "$@" --json "$OUT/$json.json" >>"$OUT/bench.log" 2>&1
  local rc=$?
  [[ $rc -eq 124 || $rc -eq 137 ]] && echo "   $name stopped at its time limit; finished rows are in $OUT/$json.json"
  [[ $rc -ne 0 && $rc -ne 124 && $rc -ne 137 ]] && { echo "   $name exit code $rc; end of its log:"; tail -15 "$OUT/bench.log"; }
  grep -h '^note:' "$OUT/bench.log" | sort -u | sed 's/^/   /' | tail -5
}
: >"$OUT/bench.log"
# shellcheck disable=SC2086
bench head "$T_HEAD" $HEAD
# shellcheck disable=SC2086
bench finetune "$T_FT" $FINETUNE
# shellcheck disable=SC2086
bench robustness "$T_ROB" $ROBUSTNESS
# shellcheck disable=SC2086
JSON_NAME=finetune_compiled bench finetune "$T_FTC" $FINETUNE_COMPILED
# shellcheck disable=SC2086
bench extract "$T_EXTRACT" $EXTRACT

echo "== summary ($(elapsed) s in all)"
python3 benchmarks/summarize.py "$OUT"/{head,finetune,robustness,finetune_compiled,extract}.json \
  --markdown "$OUT/summary.md" 2>&1 | cut -c1-600
[[ $TESTS == 1 && $FIRST == bench ]] && run_tests
exit 0
