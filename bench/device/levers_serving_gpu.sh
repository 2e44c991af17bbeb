#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool, carrying .whl and target/wheels): the whole stack
# (saw-router -> worker -> Triton kernels, Qwen3-8B shapes, dummy weights) with the default int4-bdr
# (K centering + K scale + 4 bf16 sinks + 16-token bf16 window) next to int4-bdr as it was before the K scale
# and the ring ("before"), and the 32-token window without sinks ("w32").
# Usage: [LABELS="default before ..."] bash bench/device/levers_serving_gpu.sh "D(256,1024)" 256 [saw-bench flags]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
extra=${3:-""}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
tag=$(echo "$scenario" | tr -c 'A-Za-z0-9' '_')
n=0
for label in ${LABELS:-default before}; do
  case $label in
    default) cmd="saw-router" ;;
    before) cmd="saw-router --k-scale false --window 0" ;;
    w32) cmd="saw-router --sinks 0 --window 32" ;;
    *) echo "unknown label $label"; exit 2 ;;
  esac
  n=$((n + 1))
  # shellcheck disable=SC2086
  timeout ${BENCH_TIMEOUT:-280} saw-bench --kv int4-bdr --router-cmd "$cmd" --scenario "$scenario" -c $conc \
    --max-requests 1x $extra --out "$out/$label-$tag-$n" -- --model configs/qwen3-8b --load-format dummy 2>&1 \
    | grep -v "requests done" | grep -E "output_tps|int4-bdr|error|warning" | tail -6
  grep -h "KV pool" "$out/$label-$tag-$n"/logs/*.log | head -1 | cut -c1-200
done
