#!/usr/bin/env bash
# GPU machine, repo root, after install_gpu.sh (carrying .whl and target/wheels, as bench/device/*.sh do):
# the peer engine (vLLM or upstream SGLang), one server per KV dtype, then saw, one router per --kv, then (with
# SGLANG_ENGINE_KV) saw's router over SGLang's model runner (--engine sglang), on one model folder with dummy
# weights, the same prompts from saw-bench against each, and one table + plot of all of them (bench/peer/table.py).
# An empty PEER_KV or SAW_KV leaves those rows out (to split a race over several runs: table.py joins them).
# Usage: [PEER=vllm|sglang] [PEER_KV="auto fp8 int4_per_token_head" (vllm) | "auto fp8_e4m3" (sglang)]
#        [SAW_KV="bf16 int4-bdr"] [SGLANG_ENGINE_KV="int4-bdr"] [CONFIG=configs/qwen3-8b] \
#        bash bench/peer/race_gpu.sh "D(256,1024)" 256 ["saw-bench flags", default "--max-requests 1x"]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
flags=${3:-"--max-requests 1x"}
peer=${PEER:-vllm}
# shellcheck source=bench/device/stack_env.sh
source bench/device/stack_env.sh
model=/tmp/peer-model
python3 bench/peer/dummy_model.py "${CONFIG:-configs/qwen3-8b}" "$model" || exit 1
tag=$(echo "$scenario" | tr -c 'A-Za-z0-9' '_')
port=8100

# the peer's server for one KV dtype, in its own process group (its engine core and workers go with it)
serve_peer() {
  case $peer in
    vllm) PYTHONPATH=/tmp/vsite:/tmp/vdsite VLLM_USE_FLASHINFER_SAMPLER=0 setsid python3 -m vllm.entrypoints.cli.main \
      serve "$model" --load-format dummy --kv-cache-dtype "$1" --port $port ;;
    # FA3 attention (SGLang's default on Hopper); PyTorch sampling: flashinfer's sampler would JIT-compile
    sglang) PYTHONPATH=/tmp/ssite:/tmp/sdsite setsid python3 -m sglang.launch_server --model-path "$model" \
      --load-format dummy --kv-cache-dtype "$1" --attention-backend fa3 --sampling-backend pytorch \
      --host 127.0.0.1 --port $port ;;
  esac
}

# saw-bench over one running server or saw's routers; prints its output tok/s lines and any error
bench() {
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-600}" saw-bench --tokenizer "$model" --startup-timeout 400 --scenario "$scenario" \
    -c "$conc" $flags "$@" 2>&1 | grep -E "output_tps|rror" | tail -6
}

case $peer in vllm) peer_kv=${PEER_KV-auto fp8 int4_per_token_head} ;; *) peer_kv=${PEER_KV-auto fp8_e4m3} ;; esac
# a peer that is not installed would only show as saw-bench's startup timeout, minutes later
[ -z "$peer_kv" ] || case $peer in
  vllm) PYTHONPATH=/tmp/vsite:/tmp/vdsite python3 -c "import vllm" ;;
  sglang) PYTHONPATH=/tmp/ssite:/tmp/sdsite python3 -c "import sglang" ;;
esac || { echo "$peer is not installed here: run bench/peer/install_gpu.sh $peer first"; exit 1; }
runs=()
for kv in $peer_kv; do
  run=$out/$peer-$kv-$tag
  mkdir -p "$run/logs"
  serve_peer "$kv" > "$run/logs/$peer.log" 2>&1 &
  pid=$!
  bench --url "http://127.0.0.1:$port" --label "$peer-$kv" --out "$run"
  kill -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  runs+=("$run")
done
read -r -a saw_kv <<< "${SAW_KV-bf16 int4-bdr}"
if [ ${#saw_kv[@]} -gt 0 ]; then
  bench --kv "${saw_kv[@]}" --out "$out/saw-$tag" -- --model "$model" --load-format dummy
  runs+=("$out/saw-$tag")
fi
if [ -n "${SGLANG_ENGINE_KV:-}" ]; then
  use_tree_python
  read -r -a engine_kv <<< "$SGLANG_ENGINE_KV"
  # (its formats have no bf16 window, sinks or K centering / scale: docs/sglang.md)
  PYTHONPATH=$sglang_path bench --kv "${engine_kv[@]}" --out "$out/saw-sglang-$tag" -- --model "$model" \
    --load-format dummy --engine sglang
  runs+=("$out/saw-sglang-$tag:saw --engine sglang")
fi
python3 bench/peer/table.py --out "$out/race-$peer-$tag" "${runs[@]}"
