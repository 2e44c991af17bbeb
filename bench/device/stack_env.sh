# Sourced by the whole-stack device scripts: the output folder, and the saw wheel + Locust.
# On the lent device (no network) they come from wheels carried from the build machine (.whl/ and
# target/wheels, or the saw wheel SAW_WHEEL names); elsewhere `pip install '.[bench]'` has installed them.
out=${OUT:-bench/out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    ${SAW_WHEEL:-target/wheels/saw-*.whl} || exit 1
  export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader

# --engine sglang: the tree's worker code over the wheel's copy (saw_router stays the wheel's: it holds the compiled
# router), with SGLang's folders (bench/peer/install_gpu.sh sglang) after it on sglang_path
sglang_path=/tmp/site:/tmp/ssite:/tmp/sdsite
use_tree_python() { cp -r python/saw_kv python/saw_worker python/saw_kernels python/saw_sglang /tmp/site/; }

# One saw-bench point at the caller's $scenario and $conc over a config folder's dummy weights: its output tok/s
# (and any error) printed as "LABEL: ...", its tables in $out/serving-LABEL/.
# Usage: bench_point LABEL PYTHONPATH KV MODEL_DIR [worker flags...]
bench_point() {
  local label=$1 path=$2 kv=$3 model=$4
  shift 4
  PYTHONPATH=$path timeout "${BENCH_TIMEOUT:-280}" saw-bench --kv "$kv" --scenario "$scenario" -c "$conc" \
    --max-requests 1x --out "$out/serving-$label" -- --model "$model" --load-format dummy "$@" 2>&1 \
    | grep -E "output_tps|rror" | tail -3 | sed "s/^/$label: /"
}
