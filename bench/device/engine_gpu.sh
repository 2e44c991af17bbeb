#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool): worker GPU tests, then the offline engine
# throughput of Qwen3-8B shapes (dummy weights) for bf16 / int4 / int4-bdr. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/out}
mkdir -p "$out"
python3 -c "import torch, grpc, google.protobuf as pb; print(torch.__version__, torch.cuda.get_device_name(), 'grpc', grpc.__version__, 'protobuf', pb.__version__)"
timeout 200 python3 -m pytest -q -x -m gpu tests/worker 2>&1 | tail -15 | tee "$out/engine-gpu-tests.log"
timeout 330 python3 bench/offline_throughput.py --model configs/qwen3-8b --load-format dummy \
  --kv bf16 int4 int4-bdr --batch 8 16 32 64 128 256 --input-len 256 --output-len 512 --out "$out" 2>&1 \
  | grep -v " INFO " | tee "$out/offline.log"
