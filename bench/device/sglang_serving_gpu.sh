#!/usr/bin/env bash
# Run on the lent GPU from the repo root, after `bash bench/peer/install_gpu.sh sglang` (carrying .whl and
# target/wheels): the whole stack (saw-router -> worker) with --engine sglang, then --engine saw, on Qwen3-8B shapes
# with dummy weights, the same plain KV format in both (no bf16 window, sinks, K centering or scale), one
# saw-bench point each; then saw's own engine with its default format. Results: $OUT/serving-<engine>/.
# Usage: bash bench/device/sglang_serving_gpu.sh ["D(256,1024)"] [256] [int4-bdr]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
kv=${3:-int4-bdr}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
use_tree_python
plain=(--window 0 --sinks 0 --k-center false --k-scale false)
[ "$kv" = bf16 ] && plain=()
bench_point sglang "$sglang_path" "$kv" configs/qwen3-8b --engine sglang "${plain[@]}"
bench_point saw /tmp/site "$kv" configs/qwen3-8b "${plain[@]}"
[ "$kv" = bf16 ] || bench_point saw-default /tmp/site "$kv" configs/qwen3-8b
