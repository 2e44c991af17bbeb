#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool): the GPU tests of the kernels and of the
# engine that runs them in CUDA graphs, then the kernel benchmark (bench/kernels_bench.py).
# Usage: bash bench/device/kernels_gpu.sh [kernels_bench.py flags, e.g. --only decode,latency]
set -uo pipefail
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
timeout 240 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/kernels tests/worker > "$out/gpu-tests.log" 2>&1
tail -4 "$out/gpu-tests.log"
timeout 300 python3 bench/kernels_bench.py --out "$out/kernels.json" "$@" 2>&1 | grep -v Warning
