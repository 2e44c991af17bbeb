#!/usr/bin/env bash
# GPU machine, repo root, after install_gpu.sh (carrying .whl and target/wheels, as bench/device/*.sh do):
# vLLM, one server per --kv-cache-dtype, then saw, one router per --kv, on one model folder with dummy weights,
# the same prompts from saw-bench against each, and one table + plot of all of them (bench/peer/table.py).
# Usage: [VLLM_KV="auto fp8 int4_per_token_head"] [SAW_KV="bf16 int4-bdr"] [CONFIG=configs/qwen3-8b] \
#        bash bench/peer/race_gpu.sh "D(256,1024)" 256 ["saw-bench flags", default "--max-requests 1x"]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
flags=${3:-"--max-requests 1x"}
# shellcheck source=bench/device/stack_env.sh
source bench/device/stack_env.sh
model=/tmp/peer-model
python3 bench/peer/dummy_model.py "${CONFIG:-configs/qwen3-8b}" "$model" || exit 1
tag=$(echo "$scenario" | tr -c 'A-Za-z0-9' '_')
runs=()
port=8100
for kv in ${VLLM_KV:-auto fp8 int4_per_token_head}; do
  run=$out/vllm-$kv-$tag
  mkdir -p "$run/logs"
  # its own process group, so that the engine core and its workers go with it
  PYTHONPATH=/tmp/vsite:/tmp/vdsite VLLM_USE_FLASHINFER_SAMPLER=0 setsid python3 -m vllm.entrypoints.cli.main \
    serve "$model" --load-format dummy --kv-cache-dtype "$kv" --port $port > "$run/logs/vllm.log" 2>&1 &
  pid=$!
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-600}" saw-bench --url "http://127.0.0.1:$port" --label "vllm-$kv" --tokenizer "$model" \
    --startup-timeout 400 --scenario "$scenario" -c "$conc" $flags --out "$run" 2>&1 | grep -E "output_tps|rror" | tail -4
  kill -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  runs+=("$run")
done
read -r -a saw_kv <<< "${SAW_KV:-bf16 int4-bdr}"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-600}" saw-bench --kv "${saw_kv[@]}" --tokenizer "$model" --scenario "$scenario" -c "$conc" \
  $flags --out "$out/saw-$tag" -- --model "$model" --load-format dummy 2>&1 | grep -E "output_tps|rror" | tail -6
python3 bench/peer/table.py --out "$out/race-$tag" "${runs[@]}" "$out/saw-$tag"
