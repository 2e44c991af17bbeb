#!/bin/bash
# alternate main / branch, in-process decode step
for round in 1 2; do
  for tree in main branch; do
    dir=/tmp/w/main; [ $tree = branch ] && dir=/work/cpu-layer
    for m in smollm2-135m qwen2.5-coder-0.5b; do
      echo "== round $round $tree $m $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
      (cd $dir && PYTHONPATH=python python bench/cpu_decode_step.py --model $m --kv int4-bdr --streams 1 4 --prompt-tokens 64 --steps 30 2>&1 | grep "ms/step")
    done
  done
done
