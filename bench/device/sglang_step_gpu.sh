#!/usr/bin/env bash
# GPU machine, repo root, after `bash bench/peer/install_gpu.sh sglang` (carrying .whl and target/wheels): the
# decode step of SGLang's model runner over saw's backend (SGLang's bench_one_batch: one static batch, decode CUDA
# graphs), per KV format, timed and 3 steps profiled (kernels summed by bench/device/trace_kernels.py); then saw's
# own engine at the same shape (bench/decode_profile.py, eager steps: its kernel sum is what a graph replays).
# Qwen3-8B shapes, dummy weights. Results: $OUT/sglang-step-<kv>/, $OUT/saw-decode-profile.json.
# Usage: bash bench/device/sglang_step_gpu.sh [BATCH] [CONTEXT] ["KV ..."]
set -uo pipefail
batch=${1:-256}
context=${2:-768}
read -r -a kvs <<< "${3:-int4-bdr bf16}"
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
use_tree_python
model=/tmp/peer-model
python3 bench/peer/dummy_model.py configs/qwen3-8b "$model" || exit 1
for kv in "${kvs[@]}"; do
  dir=$out/sglang-step-$kv
  mkdir -p "$dir"
  echo "== SGLang's model runner, saw's $kv"
  # the plugin registers --attention-backend saw; bench_one_batch (no server) does not load plugins itself
  SGLANG_TORCH_PROFILER_DIR=$dir SAW_SGLANG_KV="{\"kv\": \"$kv\", \"k_center\": false, \"k_scale\": false}" PYTHONPATH=$sglang_path python3 -c "
import runpy
from sglang.srt.plugins import load_plugins
load_plugins()
runpy.run_module('sglang.bench_one_batch', run_name='__main__')" \
    --model-path "$model" --load-format dummy --attention-backend saw --sampling-backend pytorch --page-size 16 \
    --disable-piecewise-cuda-graph --mem-fraction-static 0.8 --batch-size "$batch" --input-len "$context" \
    --output-len 32 --profile --profile-stage decode --profile-steps 3 --profile-activities GPU \
    > "$dir/bench_one_batch.log" 2>&1
  grep -E "^(Prefill|Decode\.|Total)|rror" "$dir/bench_one_batch.log" | tail -8
  for trace in "$dir"/*decode.trace.json.gz; do
    python3 bench/device/trace_kernels.py "$trace" --steps 3 --top 12 && rm "$trace"
  done
done
echo "== saw's engine"
python3 bench/decode_profile.py --kv "${kvs[@]}" --batch "$batch" --context "$context" --steps 3 \
  --out "$out/saw-decode-profile.json" 2>&1 | grep -vE "^\s*$|Warning" | tail -60
