#!/usr/bin/env bash
# Run on the lent GPU from the repo root, after `bash bench/peer/install_gpu.sh sglang` (carrying .whl and
# target/wheels): the whole stack (saw-router -> worker) with --engine sglang, then --engine saw, on Qwen3-8B shapes
# with dummy weights, the same KV format in both (the SGLang engine's: no bf16 window, no K centering / scale), one
# saw-bench point each; then saw's own engine with its default format. Results: $OUT/serving-<engine>/.
# Usage: bash bench/device/sglang_serving_gpu.sh ["D(256,1024)"] [256] [int4-bdr]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
kv=${3:-int4-bdr}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
# the tree's worker code over the wheel's copy (saw_router stays the wheel's: it holds the compiled router)
cp -r python/saw_kv python/saw_worker python/saw_kernels python/saw_sglang /tmp/site/
plain=(--window 0 --sinks 0 --k-center false --k-scale false)
[ "$kv" = bf16 ] && plain=()
point() {  # label, PYTHONPATH, worker flags...
  local label=$1 path=$2
  shift 2
  PYTHONPATH=$path timeout "${BENCH_TIMEOUT:-280}" saw-bench --kv "$kv" --scenario "$scenario" -c "$conc" \
    --max-requests 1x --out "$out/serving-$label" -- --model configs/qwen3-8b --load-format dummy "$@" 2>&1 \
    | grep -E "output_tps|rror" | tail -3 | sed "s/^/$label: /"
}
point sglang /tmp/site:/tmp/ssite:/tmp/sdsite --engine sglang "${plain[@]}"
point saw /tmp/site "${plain[@]}"
[ "$kv" = bf16 ] || point saw-default /tmp/site
