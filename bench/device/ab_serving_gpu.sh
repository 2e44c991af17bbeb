#!/usr/bin/env bash
# Run on the lent GPU from the repo root (`run` tool, carrying .whl, target/wheels and the "before" tree):
# the whole stack (saw-router -> worker, Qwen3-8B shapes, dummy weights, the default --kv) with the working
# tree's kernels ("new") and with another tree's saw_kernels + saw_kv ("old", e.g. `git archive HEAD
# python/saw_kernels python/saw_kv | tar -x -C .ab/old`), in the order given, one saw-bench point each.
# Usage: OLD=.ab/old/python bash bench/device/ab_serving_gpu.sh "D(256,1024)" 256 "old new old new" [kv]
set -uo pipefail
scenario=${1:-"D(256,1024)"}
conc=${2:-256}
order=${3:-"old new"}
kv=${4:-int4-bdr}
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
# the tree's worker code over the wheel's copy (saw_router stays the wheel's: it holds the compiled router)
cp -r python/saw_kv python/saw_worker python/saw_kernels /tmp/site/
rm -rf /tmp/site-old && cp -r /tmp/site /tmp/site-old && cp -r "${OLD:?OLD names the old tree}"/saw_kernels \
  "$OLD"/saw_kv /tmp/site-old/
tag=$(echo "$scenario" | tr -c 'A-Za-z0-9' '_')
n=0
for label in $order; do
  n=$((n + 1))
  path=/tmp/site
  [ "$label" = old ] && path=/tmp/site-old
  PYTHONPATH=$path timeout "${BENCH_TIMEOUT:-280}" saw-bench --kv "$kv" --scenario "$scenario" -c "$conc" \
    --max-requests 1x --out "$out/$label-$tag-$n" -- --model configs/qwen3-8b --load-format dummy 2>&1 \
    | grep -E "output_tps|rror" | tail -3 | sed "s/^/$label $n: /"
done
