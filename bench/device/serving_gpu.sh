#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool, carrying .whl and target/wheels): installs the
# saw wheel built here (abi3) and Locust's wheels, then sweeps the whole stack (saw-router -> worker
# -> Triton kernels) with Qwen3-8B shapes and dummy weights. GPU tests first when GPU_TESTS names them.
# Usage: bash bench/device/serving_gpu.sh "D(256,1024)" "32 64 128 256" "bf16 int4 int4-bdr" [saw-bench flags]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-"64"}
kvs=${3:-"bf16 int4 int4-bdr"}
extra=${4:-""}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
if [ -n "${GPU_TESTS:-}" ]; then  # e.g. GPU_TESTS="tests/worker tests/kernels"; a failure stops the run
  # shellcheck disable=SC2086
  timeout 200 python3 -m pytest -q -x -m gpu -n 8 -p no:cacheprovider $GPU_TESTS > "$out/gpu-tests.log" 2>&1
  status=$?
  tail -8 "$out/gpu-tests.log"
  [ $status = 0 ] || exit $status
fi
# K centering off, as in the paper's INT4 / INT4-BDR rows (it is the worker's default since 2026-11-23).
# shellcheck disable=SC2086
timeout ${BENCH_TIMEOUT:-560} saw-bench --kv $kvs --scenario "$scenario" -c $conc --max-requests 2x $extra \
  --out "$out/serving" -- --model configs/qwen3-8b --load-format dummy --k-center false 2>&1 | grep -v "requests done" | tail -40
grep -h "running, " "$out"/serving/logs/*.log 2>/dev/null | cut -c1-220 | awk 'NR % 3 == 0' | tail -24
