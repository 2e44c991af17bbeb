#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool): the engine's GPU tests (they compare overlapped
# graph steps with eager synchronous ones), then the offline engine with and without --overlap at the
# batch sizes where host time shows (Qwen3-8B shapes, dummy weights). Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/out}
mkdir -p "$out"
timeout 150 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/worker 2>&1 | tail -6 | tee "$out/gpu-tests.log"
for mode in --no-overlap --overlap; do
  timeout 200 python3 bench/offline_throughput.py --model configs/qwen3-8b --load-format dummy --kv int4-bdr bf16 \
    --batch 32 64 256 --input-len 256 --output-len 512 $mode --out "$out/offline$mode" 2>&1 | grep "batch"
done | tee "$out/overlap.log"
