"""GPU kernel time per step from a torch.profiler chrome trace (e.g. SGLang's bench_one_batch --profile).

    python bench/device/trace_kernels.py TRACE.json.gz --steps 3 [--top 15]

Sums the duration of every CUDA kernel event (category "kernel", which includes kernels replayed inside CUDA
graphs) by name and prints the top ones per step: total µs, calls and µs per call. --steps is how many steps the
trace holds (bench_one_batch's --profile-steps).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path


def kernel_totals(trace: Path) -> dict[str, tuple[float, int]]:
    """Kernel name -> (total µs, calls)."""
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in events:
        if ev.get("cat") == "kernel" and ev.get("ph") == "X":
            t = totals[ev["name"]]
            t[0] += float(ev.get("dur", 0.0))
            t[1] += 1
    return {name: (t[0], int(t[1])) for name, t in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    totals = kernel_totals(args.trace)
    step_us = sum(t for t, _ in totals.values()) / args.steps
    print(f"{args.trace.name}: {step_us / 1000:.2f} ms of kernels per step, {len(totals)} kernels")
    print("| kernel | µs / step | share | calls / step | µs / call |\n|---|---:|---:|---:|---:|")
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {name[:90]} | {us / args.steps:,.1f} | {us / args.steps / step_us:.1%} | "
              f"{calls / args.steps:g} | {us / calls:,.1f} |")


if __name__ == "__main__":
    main()
