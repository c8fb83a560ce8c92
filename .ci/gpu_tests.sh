#!/usr/bin/env bash
# The whole test suite on a CUDA machine (written for the 16-core H100 box) in under 5 minutes:
#
#   bash .ci/gpu_tests.sh [extra pytest args, e.g. -k converters]
#
# Needs pytest-xdist and pytest-timeout (pip install pytest-xdist pytest-timeout); CI does not use them.
# * every test's outcome is printed as it finishes ("[gw3] [ 41%] PASSED tests/...");
# * a failure's traceback is printed the moment it happens (tests/conftest.py), not only in the end summary;
# * everything also goes to $LOG (default gpu_tests.log, or $OUT/gpu_tests.log where $OUT is set) and the outcomes
#   with durations to ${LOG%.log}_outcomes.log, so a run cut short still tells which tests failed and why;
# * parallelism that does not oversubscribe: $GPU_TEST_WORKERS workers (default: cores / 2, at most 8) x
#   OMP_NUM_THREADS (default: cores / workers) torch threads; the DDP tests' 2 ranks use 1 thread each;
# * --timeout per test (default 240 s) and a budget for the whole run (default 285 s, then SIGINT: pytest
#   still prints its summary of what failed); GPU_TEST_CONTINUE=1 goes on with the tests not yet passed.
set -uo pipefail
cd "$(dirname "$0")/.."
CPUS=$(nproc)
WORKERS=${GPU_TEST_WORKERS:-$(( CPUS / 2 > 8 ? 8 : (CPUS / 2 > 1 ? CPUS / 2 : 1) ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / WORKERS > 1 ? CPUS / WORKERS : 1 ))}
export MKL_NUM_THREADS=$OMP_NUM_THREADS PYTHONUNBUFFERED=1
LOG=${LOG:-${OUT:+$OUT/}gpu_tests.log}
export LIGHTNING_APP_TEST_LOG=${LOG%.log}_outcomes.log
# GPU_TEST_CONTINUE=1: a run cut short goes on where it stopped (the tests that passed before are deselected)
SKIP=()
if [ -n "${GPU_TEST_CONTINUE:-}" ] && [ -f "$LIGHTNING_APP_TEST_LOG" ]; then
  while read -r outcome node _; do
    [ "$outcome" = PASSED ] || [ "$outcome" = SKIPPED ] && SKIP+=(--deselect "$node")
  done < "$LIGHTNING_APP_TEST_LOG"
  echo "continuing: $(( ${#SKIP[@]} / 2 )) tests that already passed or were skipped are deselected" | tee -a "$LOG"
else
  : > "$LIGHTNING_APP_TEST_LOG"
fi
python - <<'PY' 2>&1 | tee "$LOG"
import os, platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"python {platform.python_version()}, torch {torch.__version__}, {gpu}, {os.cpu_count()} cpus")
PY
echo "workers $WORKERS x OMP_NUM_THREADS $OMP_NUM_THREADS; log $LOG, outcomes $LIGHTNING_APP_TEST_LOG" | tee -a "$LOG"
timeout -s INT -k 30 "${GPU_TEST_BUDGET:-285}" \
  python -m pytest -n "$WORKERS" --timeout "${GPU_TEST_TIMEOUT:-240}" -v -rfE --durations=25 \
    -p no:benchmark "${SKIP[@]}" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "exit code $rc$( [ "$rc" = 124 ] || [ "$rc" = 130 ] && echo ": cut by the budget (go on: GPU_TEST_CONTINUE=1 bash .ci/gpu_tests.sh)")" | tee -a "$LOG"
exit "$rc"
