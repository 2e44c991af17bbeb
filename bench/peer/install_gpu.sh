#!/usr/bin/env bash
# GPU machine, repo root, once per carried piece (each run carries one .peer/ENGINE/qN and .peer/ENGINE/pieces):
# keeps the piece in /tmp/peer-ENGINE; the run that completes the set installs the engine's tree and the
# dependencies the image lacks into their own folders (vllm: /tmp/vsite + /tmp/vdsite, sglang: /tmp/ssite +
# /tmp/sdsite). Idempotent: later runs say it is installed.
# Usage: bash bench/peer/install_gpu.sh [vllm|sglang]
set -euo pipefail
engine=${1:-vllm}
case $engine in
  vllm) site=/tmp/vsite dsite=/tmp/vdsite check="import vllm, vllm.v1.engine.core as m; v = vllm.__version__" ;;
  sglang) site=/tmp/ssite dsite=/tmp/sdsite
    check="import sglang, sglang.srt.entrypoints.engine as m, sgl_kernel; v = sglang.__version__" ;;
  *) echo "unknown engine $engine (vllm or sglang)"; exit 2 ;;
esac
stage=/tmp/peer-$engine
mkdir -p "$stage"
cp .peer/"$engine"/q* .peer/"$engine"/pieces "$stage"/ 2>/dev/null || true
cd "$stage"
if [ -f "$site/.installed" ]; then echo "$engine already installed"; exit 0; fi
want=$(cat pieces)
have=$(find . -maxdepth 1 -name 'q*' | wc -l)
if [ "$have" -lt "$want" ]; then echo "staged $have of $want pieces"; exit 0; fi
rm -rf bundle && mkdir bundle
for i in $(seq 0 $((want - 1))); do cat "q$i"; done | tar -x -C bundle
python3 -m pip install -q --no-index --no-deps --target /tmp/zsite bundle/deps/zstandard-*.whl
mkdir -p "$site"
PYTHONPATH=/tmp/zsite python3 - "$site" <<'PY'
import sys
import tarfile
import zstandard
with open("bundle/engine.tar.zst", "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
    with tarfile.open(fileobj=r, mode="r|") as t:
        t.extractall(sys.argv[1])
PY
python3 -m pip install -q --no-index --no-deps --no-compile --target "$dsite" bundle/deps/*.whl
rm -rf bundle
PYTHONPATH=$site:$dsite python3 -c "$check; print('$engine', v, 'ready')"
touch "$site/.installed"
