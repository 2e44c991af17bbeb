bash bench/peer/install_gpu.sh sglang || exit 1
source bench/device/stack_env.sh > /dev/null; use_tree_python
PYTHONPATH=$sglang_path timeout 240 python3 -m pytest -q -m gpu tests/sglang/test_sglang_gpu.py -k structured_output -x -s -p no:cacheprovider > $OUT/gpu-test-structured.log 2>&1; tail -5 $OUT/gpu-test-structured.log | cut -c1-400
