#!/usr/bin/env bash
# Run on the lent GPU from the repo root, after `bash bench/peer/install_gpu.sh sglang` (carrying .whl and
# target/wheels): --engine sglang's GPU tests (greedy tokens against --engine saw on the same weights). The saw
# wheel brings the plugin's entry point; the tree's python/ comes first, so SGLang's processes import this code.
set -uo pipefail
# shellcheck source=bench/device/stack_env.sh
source "$(dirname "$0")/stack_env.sh"
export PYTHONPATH=$PWD/python:/tmp/site:/tmp/ssite:/tmp/sdsite
python3 -c "import sglang, sgl_kernel; from importlib.metadata import entry_points as e
print('sglang', sglang.__version__, 'plugins', [p.value for p in e(group='sglang.srt.plugins')])" || exit 1
set -o pipefail
timeout "${SGLANG_TEST_TIMEOUT:-480}" python3 -m pytest -q -x -s -m gpu tests/sglang ${PYTEST_ARGS:-} 2>&1 \
  | grep -v -E "it/s]|s/it]" | tee "$out/sglang-gpu.log" | tail -60
