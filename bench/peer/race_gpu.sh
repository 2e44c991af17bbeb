#!/usr/bin/env bash
# GPU machine, repo root, after install_gpu.sh (carrying .whl and target/wheels, as bench/device/*.sh do):
# the peer engine (vLLM or upstream SGLang), one server per KV dtype, then saw, one router per --kv, then (with
# SGLANG_ENGINE_KV) saw's router over SGLang's model runner (--engine sglang), on one model folder with dummy
# weights. Each server starts once and serves every point (scenario@concurrency) in turn, the same prompts from
# saw-bench against each; then one table + plot of all of them (bench/peer/table.py), each row also as a fraction of
# its roofline bound (bench/peer/roofline.py, with this GPU's copy bandwidth and matmul rate measured first).
# Each point warms its server with concurrency/8 requests first (discarded), then sends 1x concurrency requests.
# An empty PEER_KV or SAW_KV leaves those rows out (to split a race over several runs: table.py joins them).
# SAW_FLAGS: worker flags for saw's routers (both engines), e.g. the SGLang engine's format on --engine saw:
# "--window 0 --sinks 0 --k-center false --k-scale false".
# Usage: [PEER=vllm|sglang] [PEER_KV="auto fp8 int4_per_token_head" (vllm) | "auto fp8_e4m3" (sglang)]
#        [SAW_KV="bf16 int4-bdr"] [SGLANG_ENGINE_KV="int4-bdr"] [SAW_FLAGS=...] [CONFIG=configs/qwen3-8b] \
#        bash bench/peer/race_gpu.sh ["D(256,1024)@256 D(16384,1024)@64"]
set -uo pipefail
read -r -a points <<< "${1:-D(256,1024)@256}"
peer=${PEER:-vllm}
# shellcheck source=bench/device/stack_env.sh
source bench/device/stack_env.sh
use_tree_python
model=/tmp/peer-model
python3 bench/peer/dummy_model.py "${CONFIG:-configs/qwen3-8b}" "$model" || exit 1
port=8100
url=http://127.0.0.1:$port
read -r -a saw_flags <<< "${SAW_FLAGS:-}"

# the peer's server for one KV dtype
serve_peer() {
  case $peer in
    vllm) PYTHONPATH=/tmp/vsite:/tmp/vdsite VLLM_USE_FLASHINFER_SAMPLER=0 python3 -m vllm.entrypoints.cli.main \
      serve "$model" --load-format dummy --kv-cache-dtype "$1" --port $port ;;
    # FA3 attention (SGLang's default on Hopper); PyTorch sampling: flashinfer's sampler would JIT-compile
    sglang) PYTHONPATH=/tmp/ssite:/tmp/sdsite python3 -m sglang.launch_server --model-path "$model" \
      --load-format dummy --kv-cache-dtype "$1" --attention-backend fa3 --sampling-backend pytorch \
      --host 127.0.0.1 --port $port ;;
  esac
}

# saw's router for one --kv, with the engine flags given after it
serve_saw() {
  local kv=$1
  shift
  saw-router --workers 1 --kv "$kv" --host 127.0.0.1 --port $port --model "$model" --load-format dummy \
    "${saw_flags[@]}" "$@"
}

# GPU memory in use, MiB: a server's processes may still be exiting when the next one sizes its pool
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 || echo 0; }

# One server (the command after RUN LABEL TABLE_NAME) in a process group of its own (set -m), every point against
# it, then stopped with its engine core and workers. Point folders: $out/RUN-<scenario>c<conc>/, the server's log
# in each (table.py reads the KV capacity from it). TABLE_NAME names saw's rows in the table.
race() {
  local name=$1 label=$2 table_name=$3 log=$out/$1.log
  shift 3
  set -m
  "$@" > "$log" 2>&1 &
  local pid=$!
  set +m
  for point in "${points[@]}"; do
    local scenario=${point%@*} conc=${point#*@}
    local run
    run=$out/$name-$(echo "$scenario" | tr -c 'A-Za-z0-9' '_')c$conc
    kill -0 -- -"$pid" 2>/dev/null || { echo "== $name: the server exited (its log: $log)"; tail -5 "$log"; break; }
    echo "== $name: $scenario c=$conc"
    timeout "${BENCH_TIMEOUT:-600}" saw-bench --url "$url" --label "$label" --tokenizer "$model" \
      --startup-timeout 400 --scenario "$scenario" -c "$conc" --max-requests 1x \
      --warmup-requests $((conc / 8)) --out "$run" 2>&1 | grep -E "output_tps|rror" | tail -6
    mkdir -p "$run/logs" && cp "$log" "$run/logs/$label.log"
    [ -f "$run/summary.json" ] && runs+=("$run:$table_name")
  done
  kill -INT -- -"$pid" 2>/dev/null
  for _ in $(seq 30); do kill -0 -- -"$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- -"$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  for _ in $(seq 60); do [ "$(gpu_used)" -lt 2000 ] && break; sleep 1; done
}

case $peer in vllm) peer_kv=${PEER_KV-auto fp8 int4_per_token_head} ;; *) peer_kv=${PEER_KV-auto fp8_e4m3} ;; esac
# a peer that is not installed (or lacks a module its HTTP server imports) would only show as saw-bench's startup
# timeout, minutes later
[ -z "$peer_kv" ] || case $peer in
  vllm) PYTHONPATH=/tmp/vsite:/tmp/vdsite python3 -c "import vllm.entrypoints.openai.api_server" ;;
  sglang) PYTHONPATH=/tmp/ssite:/tmp/sdsite python3 -c "import sglang.srt.entrypoints.http_server" ;;
esac || { echo "$peer is not installed here: run bench/peer/install_gpu.sh $peer first"; exit 1; }
# the roofline's ceilings (copy bandwidth, bf16 matmul rate), measured in this hold before any server starts
ceilings=()
python3 bench/peer/roofline.py --measure "$out/ceilings.json" && ceilings=(--ceilings "$out/ceilings.json")
runs=()
for kv in $peer_kv; do
  race "$peer-$kv" "$peer-$kv" "$peer" serve_peer "$kv"
done
for kv in ${SAW_KV-bf16 int4-bdr}; do
  race "saw-$kv" "$kv" saw serve_saw "$kv"
done
for kv in ${SGLANG_ENGINE_KV:-}; do
  # (its formats have no bf16 window or sinks: docs/sglang.md)
  PYTHONPATH=$sglang_path race "saw-sglang-$kv" "$kv" "saw --engine sglang" serve_saw "$kv" --engine sglang
done
python3 bench/peer/table.py --out "$out/race-$peer" "${ceilings[@]}" --config "${CONFIG:-configs/qwen3-8b}" "${runs[@]}"
