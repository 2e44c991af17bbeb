#!/usr/bin/env bash
# GPU machine, repo root, once per carried piece (each run carries one .peer/qN and .peer/pieces): keeps the
# piece in /tmp/peer; the run that completes the set installs vLLM into /tmp/vsite and the dependencies the
# image lacks into /tmp/vdsite. Idempotent: later runs say it is installed.
set -euo pipefail
mkdir -p /tmp/peer
cp .peer/q* .peer/pieces /tmp/peer/ 2>/dev/null || true
cd /tmp/peer
if [ -d /tmp/vsite/vllm ]; then echo "vLLM already installed"; exit 0; fi
want=$(cat pieces)
have=$(find . -maxdepth 1 -name 'q*' | wc -l)
if [ "$have" -lt "$want" ]; then echo "staged $have of $want pieces"; exit 0; fi
rm -rf bundle && mkdir bundle
for i in $(seq 0 $((want - 1))); do cat "q$i"; done | tar -x -C bundle
python3 -m pip install -q --no-index --no-deps --target /tmp/zsite bundle/deps/zstandard-*.whl
mkdir -p /tmp/vsite
PYTHONPATH=/tmp/zsite python3 - <<'PY'
import tarfile
import zstandard
with open("bundle/vllm.tar.zst", "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
    with tarfile.open(fileobj=r, mode="r|") as t:
        t.extractall("/tmp/vsite")
PY
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vdsite bundle/deps/*.whl
rm -rf bundle
PYTHONPATH=/tmp/vsite:/tmp/vdsite python3 -c "import vllm, vllm.v1.engine.core; print('vLLM', vllm.__version__, 'ready')"
