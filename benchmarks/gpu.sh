#!/usr/bin/env bash
# The GPU check in one command (about 7 minutes on an H100): install the carried wheels, run the GPU tests
# (.ci/gpu_tests.sh when present), then the four benchmarks of the product's own path against Keras 3 with small
# GPU flags, each under its own timeout and writing its JSON into $OUT as rows finish, then one summary.
#
#   bash benchmarks/gpu.sh          # on the GPU machine (carry .whl/: see /work/shared/gpu/wheels.sh)
#   bash benchmarks/gpu.sh --cpu    # the same script end to end with tiny flags, to check it on a CPU first
#
# Files in $OUT (default ./bench-out): gpu_tests.log, extract.json, head.json, finetune.json, robustness.json,
# bench.log (every benchmark's full output), summary.md. Time limits (seconds) can be set from the environment:
# GPU_TESTS_TIMEOUT EXTRACT_TIMEOUT HEAD_TIMEOUT FINETUNE_TIMEOUT ROBUSTNESS_TIMEOUT.
# The GPU machine has no TensorFlow: the Keras reference there is Keras-JAX (mixed_bfloat16 where ours runs bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
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
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("keras", "jax", "tensorflow", "timm", "pytorch_lightning", "kornia", "jsonargparse"):
    spec = importlib.util.find_spec(m)
    print(f"  {m}: {'missing' if spec is None else __import__(m).__version__}")
EOF

# 1. GPU tests first (the "trust" helper's command, when it exists)
if [[ -f .ci/gpu_tests.sh ]]; then
  echo "== GPU tests (.ci/gpu_tests.sh, limit ${GPU_TESTS_TIMEOUT:-100} s)"
  timeout -k 10 "${GPU_TESTS_TIMEOUT:-100}" bash .ci/gpu_tests.sh 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  echo "GPU tests exit code ${PIPESTATUS[0]} ($(elapsed) s so far)"
else
  echo "== no .ci/gpu_tests.sh: GPU tests skipped"
fi

# 2. the benchmarks: flags per mode (see each script's --help); each row lands in $OUT/<name>.json as it finishes
if [[ $MODE == gpu ]]; then
  EXTRACT="--models InceptionV3 ResNet50 --n-images 2048"
  HEAD="--rows 50000 --epochs 3"
  FINETUNE="--models ResNet50 --steps 30 --batch 64"
  ROBUSTNESS="--models ResNet50 --n-images 512 --batch 64 --corruptions gaussian_noise defocus_blur"
  T_EXTRACT=${EXTRACT_TIMEOUT:-130}; T_HEAD=${HEAD_TIMEOUT:-50}; T_FT=${FINETUNE_TIMEOUT:-90}; T_ROB=${ROBUSTNESS_TIMEOUT:-60}
else
  EXTRACT="--models ResNet50 --n-images 24 --batch 8 --loader-batches 1"
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
