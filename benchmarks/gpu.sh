#!/usr/bin/env bash
# The GPU check: install the carried wheels, run the test suite (.ci/gpu_tests.sh when present, up to ~5 minutes
# by its own budget), then the four benchmarks of the product's own path against Keras 3 with small GPU flags
# (~6.5 minutes on an H100), each under its own timeout and writing its JSON into $OUT as rows finish, then one
# summary. Where one command may run at most 10 minutes, run it as two: --tests-only, then --skip-tests.
#
#   bash benchmarks/gpu.sh [--skip-tests | --tests-only]   # on the GPU machine (carry .whl/, see wheels.sh)
#   bash benchmarks/gpu.sh --cpu                           # the same script end to end with tiny flags on a CPU
#
# Files in $OUT (default ./bench-out): gpu_tests.log and gpu_tests_outcomes.log (tests), extract.json, head.json,
# finetune.json, robustness.json, bench.log (every benchmark's full output), summary.md. Benchmark time limits
# (seconds) can be set from the environment: EXTRACT_TIMEOUT HEAD_TIMEOUT FINETUNE_TIMEOUT ROBUSTNESS_TIMEOUT;
# GPU_TEST_ARGS passes pytest arguments to the tests (e.g. "--ignore tests/test_parity.py" on a short lease).
# The GPU machine has no TensorFlow: the Keras reference there is Keras-JAX (mixed_bfloat16 where ours runs bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu TESTS=1 BENCH=1
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu TESTS=0 ;;  # the CPU suite is CI's job; add --tests after --cpu to run it anyway
    --tests) TESTS=1 ;;
    --skip-tests) TESTS=0 ;;
    --tests-only) BENCH=0 ;;
    *) echo "unknown argument $arg (use --cpu, --tests, --skip-tests, --tests-only)"; exit 2 ;;
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

# 1. the test suite first (.ci/gpu_tests.sh: its own log files in $OUT and its own time budget, GPU_TEST_BUDGET)
if [[ $TESTS == 1 && -f .ci/gpu_tests.sh ]]; then
  echo "== tests: bash .ci/gpu_tests.sh (budget ${GPU_TEST_BUDGET:-285} s)"
  # shellcheck disable=SC2086
  OUT=$OUT bash .ci/gpu_tests.sh ${GPU_TEST_ARGS:-} 2>&1 | grep -E "passed|failed|error|FAILED|ERROR|exit code|workers|cpus" | tail -40
  echo "tests done ($(elapsed) s so far)"
elif [[ $TESTS == 1 ]]; then
  echo "== no .ci/gpu_tests.sh: tests skipped"
fi
[[ $BENCH == 0 ]] && exit 0

# 2. the benchmarks: flags per mode (see each script's --help); each row lands in $OUT/<name>.json as it finishes
if [[ $MODE == gpu ]]; then
  # one model per benchmark: each model costs a Keras-JAX XLA compilation and ours' warm-up / compilation
  EXTRACT="--models InceptionV3 --n-images 2048 --warmup-batches 3"
  HEAD="--rows 50000 --epochs 3"
  FINETUNE="--models ResNet50 --steps 30 --batch 64"
  ROBUSTNESS="--models ResNet50 --n-images 512 --batch 64 --corruptions gaussian_noise defocus_blur"
  T_EXTRACT=${EXTRACT_TIMEOUT:-140}; T_HEAD=${HEAD_TIMEOUT:-60}; T_FT=${FINETUNE_TIMEOUT:-130}; T_ROB=${ROBUSTNESS_TIMEOUT:-100}
else
  EXTRACT="--models ResNet50 --n-images 24 --batch 8"
  HEAD="--rows 2000 --epochs 2"
  FINETUNE="--models ResNet50 --steps 2 --batch 4"
  ROBUSTNESS="--models ResNet50 --n-images 8 --batch 4 --corruptions gaussian_noise"
  T_EXTRACT=${EXTRACT_TIMEOUT:-900}; T_HEAD=${HEAD_TIMEOUT:-400}; T_FT=${FINETUNE_TIMEOUT:-900}; T_ROB=${ROBUSTNESS_TIMEOUT:-900}
fi

bench() {  # name, time limit, flags...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit $limit s, $(elapsed) s so far): python3 benchmarks/$name.py $* --json \$OUT/$name.json"
  timeout -k 15 "$limit" python3 "benchmarks/$name.py" "$@" --json "$OUT/$name.json" >>"$OUT/bench.log" 2>&1
  local rc=$?
  [[ $rc -eq 124 || $rc -eq 137 ]] && echo "   $name stopped at its time limit; finished rows are in $OUT/$name.json"
  [[ $rc -ne 0 && $rc -ne 124 && $rc -ne 137 ]] && { echo "   $name exit code $rc; end of its log:"; tail -15 "$OUT/bench.log"; }
  grep -h '^note:' "$OUT/bench.log" | sort -u | sed 's/^/   /' | tail -5
}
: >"$OUT/bench.log"
# shellcheck disable=SC2086
bench extract "$T_EXTRACT" $EXTRACT
# shellcheck disable=SC2086
bench head "$T_HEAD" $HEAD
# shellcheck disable=SC2086
bench finetune "$T_FT" $FINETUNE
# shellcheck disable=SC2086
bench robustness "$T_ROB" $ROBUSTNESS

echo "== summary ($(elapsed) s in all)"
python3 benchmarks/summarize.py "$OUT"/{extract,head,finetune,robustness}.json --markdown "$OUT/summary.md" 2>&1 | cut -c1-600
