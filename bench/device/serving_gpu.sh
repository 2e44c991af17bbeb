#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool, carrying .whl and target/wheels): installs the
# saw wheel built here (abi3) and Locust's wheels, runs the GPU tests, then a short serving sweep of
# the whole stack (saw-router -> worker -> Triton kernels) with Qwen3-8B shapes.
# Usage: bash bench/device/serving_gpu.sh "D(256,1024)" "64" "bf16 int4-bdr"
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-"64"}
kvs=${3:-"bf16 int4 int4-bdr"}
out=${OUT:-bench/out}
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl target/wheels/saw-*.whl || exit 1
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/worker tests/kernels 2>&1 | tail -12 \
  | tee "$out/gpu-tests.log"
# shellcheck disable=SC2086
timeout 480 saw-bench --kv $kvs --scenario "$scenario" -c $conc --max-requests 2x --duration 120 \
  --out "$out/serving" -- --model configs/qwen3-8b --load-format dummy 2>&1 | tail -40
