#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool, carrying .whl and target/wheels): GPU tests,
# then where a decode step's time goes (offline engine: step wall vs runner vs graph-replay GPU time),
# then one format through the whole stack with the worker's step log. Results land in $OUT.
# Usage: bash bench/device/profile_gpu.sh [kv for the serving run] [concurrencies]
set -uo pipefail
serve_kv=${1:-int4-bdr}
conc=${2:-"64 256"}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
timeout 200 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/worker tests/kernels 2>&1 | tail -8 \
  | tee "$out/gpu-tests.log"
timeout 200 python3 bench/offline_throughput.py --model configs/qwen3-8b --load-format dummy --kv bf16 int4-bdr \
  --batch 64 256 --input-len 256 --output-len 768 --out "$out" 2>&1 | grep -v " INFO " | tee "$out/offline.log"
# shellcheck disable=SC2086
timeout 300 saw-bench --kv $serve_kv --scenario "D(256,1024)" -c $conc --max-requests 2x --duration 120 \
  --out "$out/serving" -- --model configs/qwen3-8b --load-format dummy --k-center false 2>&1 | tail -25
grep -h "running, " "$out"/serving/logs/*.log 2>/dev/null | tail -30
