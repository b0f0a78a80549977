#!/usr/bin/env bash
# Soak: runs the test suites RUNS times in a row under a CPU hog (one busy process per
# core, at the tests' own priority), stopping at the first failure, whose log it keeps.
# A suite that fails by chance fails here long before it fails in CI.
#
#   tests/soak.sh                      # 20 runs of the whole suite (the README's test command)
#   RUNS=50 tests/soak.sh --test workloads --test replicas
#   HOG=0 tests/soak.sh                # without the hog
#
# Arguments go to `cargo test` as they are. Logs: target/soak/run-N.log; the summary
# line says how many runs passed and how long each took.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-20}"
hogs="${HOG:-$(nproc)}"
mkdir -p target/soak
# Built once, so every run measures the tests and not the compiler.
cargo test --no-run "$@" >/dev/null 2>&1 || cargo test --no-run "$@"

pids=()
stop_hogs() { [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true; }
trap stop_hogs EXIT
for _ in $(seq 1 "$hogs"); do
  (while :; do :; done) &
  pids+=($!)
done

passed=0
times=()
for run in $(seq 1 "$runs"); do
  log="target/soak/run-$run.log"
  start=$(date +%s)
  if cargo test "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    times+=("$(( $(date +%s) - start ))s")
    echo "soak: run $run/$runs passed in ${times[-1]}"
  else
    echo "soak: run $run/$runs FAILED after $(( $(date +%s) - start ))s; log: $log" >&2
    grep -E "^test .* FAILED|panicked at|^---- " "$log" | head -20 >&2 || true
    echo "soak: $passed of $runs runs passed before the failure (hogs: $hogs)" >&2
    exit 1
  fi
done
echo "soak: $passed of $runs runs passed, 0 failures (hogs: $hogs; times: ${times[*]})"
