#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool, carrying .whl and target/wheels): accuracy of the
# KV formats through the whole stack (saw-router -> worker -> Triton kernels) on a real model:
# HumanEval (all 164, greedy) and decode-time perplexity / KL against bf16 (every position a decode-like
# step: --max-prefill-tokens 1, so each token reads older ones from the KV format, as generation does).
# The model's GGUF comes staged in pieces under .stage/ (the GPU machine has no network):
#   split -b 56M -d ~/.cache/saw/models/qwen2.5-coder-0.5b/*.gguf .stage/qwen.part
# Usage: [TASKS="humaneval ppl"] [FORMATS="bf16,int4-bdr"] bash bench/device/accuracy_gpu.sh [model alias] [md5]
set -uo pipefail
model=${1:-qwen2.5-coder-0.5b}
md5=${2:-}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
export SAW_CACHE_DIR=/tmp/saw-models
gguf=$(python3 -c "from saw_worker.loader.aliases import ALIASES; print(ALIASES['$model'].filename)")
mkdir -p "$SAW_CACHE_DIR/$model"
cat ${STAGE:-.stage}/*.part* > "$SAW_CACHE_DIR/$model/$gguf" || exit 1
if [ -n "$md5" ]; then
  echo "$md5  $SAW_CACHE_DIR/$model/$gguf" | md5sum -c - || exit 1
fi
# default: bf16, the default, the default before the K scale and the ring
IFS=, read -r -a formats <<< "${FORMATS:-bf16,int4-bdr,int4-bdr --window 0 --k-scale false}"
case " ${TASKS:-humaneval ppl} " in *" humaneval "*)
  timeout 330 saw-eval humaneval --model "$model" --kv "${formats[@]}" --concurrency 32 --log-dir "$out/logs" \
    --out "$out/humaneval.json" 2>&1 | grep -v -E "it/s|s/it" | tail -12 ;;
esac
case " ${TASKS:-humaneval ppl} " in *" ppl "*)
  timeout "${PPL_TIMEOUT:-240}" saw-eval ppl --model "$model" --kv "${formats[@]}" --windows 8 --window 1024 \
    --log-dir "$out/logs" --worker-arg=--max-prefill-tokens=1 --out "$out/ppl.json" 2>&1 | grep -v -E "it/s|s/it" \
    | tail -8 ;;
esac
