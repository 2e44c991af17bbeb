#!/usr/bin/env bash
# lm-eval's local-completions client (batched prompts: --batch_size > 1) against saw-router, one router per
# --kv format, on the two small tasks beside this script (a generated answer; a four-way choice by loglikelihood).
# Needs `pip install "lm-eval[api]"` (it fetches nothing at run time: the data and the tokenizer are local).
# Usage, from the repo root: [MODEL=smollm2-135m] [FORMATS="bf16 int4-bdr"] [BATCH=4] bash bench/lmeval/run_lmeval.sh OUT_DIR
set -euo pipefail
out=${1:-bench/out/lmeval}
model=${MODEL:-smollm2-135m}
port=${PORT:-30310}
mkdir -p "$out"
tok="$out/tokenizer-$model"
# the model's own tokenizer, as a folder transformers loads (lm-eval counts context tokens with it)
python3 - "$model" "$tok" <<'PY'
import json, sys
from pathlib import Path
from saw_worker.loader.aliases import resolve_alias
from saw_worker.loader.gguf_file import open_gguf
from saw_worker.loader.tokenizer import tokenizer_from_gguf
info = tokenizer_from_gguf(open_gguf(resolve_alias(sys.argv[1])).meta)
folder = Path(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
(folder / "tokenizer.json").write_text(info.tokenizer_json)
(folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": info.eos_token, "bos_token": info.bos_token or None}))
PY
for kv in ${FORMATS:-bf16 int4-bdr}; do
  saw-router --model "$model" --kv "$kv" --port "$port" > "$out/router-$kv.log" 2>&1 &
  router=$!
  trap 'kill $router 2>/dev/null' EXIT
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break; sleep 2; done
  lm_eval --model local-completions --tasks saw_capitals_gen,saw_capitals_mc --include_path bench/lmeval \
    --model_args "model=$model,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=huggingface,tokenizer=$tok,num_concurrent=1,max_retries=1" \
    --batch_size "${BATCH:-4}" --output_path "$out/$kv" 2>&1 | grep -E "^\|" || true
  kill $router; wait $router 2>/dev/null || true
done
