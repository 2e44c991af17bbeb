"""The CPU path's INT4 products, the reference's torch ones against the C++ loops of commit 26fbcac (reverted after
it), at 100 and 1,000 positions (B 1, 3 KV heads, 3 query rows, D 64, random slots of a 143,680-slot pool).

    python bench/sweeps/cpu-int4-2026-12-03/products_micro.py    # at commit 26fbcac
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, "python")
from saw_worker.kv import cpu_int4  # noqa: E402
from saw_worker.kv.reference import TORCH_INT4  # noqa: E402


def us_per_call(fn: Callable[[], object], n: int = 500) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    cpp = cpu_int4.products()
    for length in (100, 1000):
        codes = torch.randint(0, 256, (143680, 3, 32), dtype=torch.uint8)
        params = torch.rand(143680, 3, 2).half()
        slots = torch.randint(0, 143680, (1, length))
        q = torch.randn(1, 3, 3, 64)
        probs = torch.softmax(torch.randn(1, 3, 3, length), -1)
        for name, prods in (("torch", TORCH_INT4), ("cpp", cpp)):
            args = (codes, params, slots)
            s = us_per_call(lambda prods=prods, q=q, args=args: prods.scores(q, *args))
            w = us_per_call(lambda prods=prods, probs=probs, args=args: prods.weighted(probs, *args))
            print(f"{length} {name} scores {s:.1f} us weighted {w:.1f} us")


if __name__ == "__main__":
    main()
