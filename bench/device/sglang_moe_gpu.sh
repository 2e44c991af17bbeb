#!/usr/bin/env bash
# Run on the lent GPU from the repo root, after `bash bench/peer/install_gpu.sh sglang` (carrying .whl and
# target/wheels): Qwen3-30B-A3B's shapes (configs/qwen3-30b-a3b: Qwen3-MoE, 128 experts, 8 active; 57 GiB of dummy
# bf16 weights), an architecture --engine saw does not run, through the whole stack (saw-router -> worker) with
# --engine sglang: SGLang's Qwen3-MoE model code (its Triton fused MoE, what SGLang picks for bf16 experts on
# Hopper) over saw's KV pool and kernels. One saw-bench point per KV format (default int4-bdr, then bf16); results
# in $OUT/serving-moe-<kv>/. A point takes minutes (SGLang's start, CUDA graphs to batch 256): on the lent GPU one
# format per run, e.g. BENCH_TIMEOUT=540 bash bench/device/sglang_moe_gpu.sh "D(256,1024)" 256 int4-bdr
# Usage: bash bench/device/sglang_moe_gpu.sh ["D(256,1024)"] [256] [KV ...]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
formats=("${@:3}")
[ ${#formats[@]} -gt 0 ] || formats=(int4-bdr bf16)
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
use_tree_python
for kv in "${formats[@]}"; do
  plain=(--window 0 --sinks 0 --k-center false --k-scale false)
  [ "$kv" = bf16 ] && plain=()
  bench_point "moe-$kv" "$sglang_path" "$kv" configs/qwen3-30b-a3b --engine sglang "${plain[@]}"
done
