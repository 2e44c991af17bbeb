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
