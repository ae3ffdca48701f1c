#!/usr/bin/env bash
# Set everything up and run the whole test suite: unit tests, the build script's smoke run, and
# every notebook under nbval, all on the CPU and offline.
#
#   bash scripts/test.sh                 # everything, in two shards side by side (below)
#   bash scripts/test.sh ARGS...         # one plain pytest run with your arguments, e.g.
#   bash scripts/test.sh notebooks/05_sampling_loop_and_guidance.ipynb
#   bash scripts/test.sh tests/test_real_switch.py -k 02_vae
#
# Why two shards: the models are tiny, so one pytest process cannot keep two CPU threads busy
# (a second OpenMP thread mostly waits). Two processes with half the cores each finish the suite
# in about half the time. Shard A is the COURSE_MODEL=real notebook runs and the build scripts'
# smoke runs; shard B is everything else (all nbval notebooks and the other unit tests), so a new
# test file lands in B without touching this script. Each notebook's cells still run in order in
# one kernel, as nbval needs. On a single core the shards run one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 COURSE_MODEL=mini TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
PYTEST=(.venv/bin/python -m pytest)
if [ "$#" -gt 0 ]; then
  exec "${PYTEST[@]}" "$@"
fi

SHARD_A=(tests/test_real_switch.py tests/test_build_script.py tests/test_build_tasks.py)
IGNORE_A=()
for path in "${SHARD_A[@]}"; do IGNORE_A+=(--ignore "$path"); done
CORES=$(.venv/bin/python -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)")
THREADS=$(( CORES / 2 > 0 ? CORES / 2 : 1 ))
WORK=$(mktemp -d)
trap 'kill "${PID_A:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "shard A (${SHARD_A[*]}) and shard B (everything else), $THREADS CPU thread(s) each"
run_a() { OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "${PYTEST[@]}" --durations=10 --basetemp "$WORK/tmp-a" "${SHARD_A[@]}"; }
run_b() { OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS "${PYTEST[@]}" --durations=10 --basetemp "$WORK/tmp-b" "${IGNORE_A[@]}"; }
if [ "$CORES" -lt 2 ]; then
  status_a=0; run_a || status_a=$?
  status_b=0; run_b || status_b=$?
else
  run_a > "$WORK/shard-a.log" 2>&1 &
  PID_A=$!
  echo "----- shard B -----"
  status_b=0; run_b || status_b=$?
  status_a=0; wait "$PID_A" || status_a=$?
  PID_A=
  echo "----- shard A -----"
  cat "$WORK/shard-a.log"
fi
echo "shard A: exit $status_a; shard B: exit $status_b"
[ "$status_a" -eq 0 ] && [ "$status_b" -eq 0 ]
