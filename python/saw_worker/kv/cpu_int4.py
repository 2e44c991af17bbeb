"""The C++ loops of cpu_int4.cpp: the CPU path's products of attention with INT4 rows (kv/reference.py's
Int4Products) without unpacking the rows into tensors, one loop each instead of about ten small ops. Built on
first use with torch's extension builder (a C++ compiler and ninja; ~35 s on 2 cores, then cached under torch's
extensions folder); where it cannot be built the torch products serve, which these are tested against."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

from saw_worker.kv.reference import TORCH_INT4, Int4Products

log = logging.getLogger("saw_worker")


@functools.cache
def products() -> Int4Products:
    """The C++ products, or the torch ones (with a logged reason) where the extension cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        t0 = time.perf_counter()
        ext = load("saw_cpu_int4", [str(Path(__file__).with_suffix(".cpp"))], extra_cflags=["-O3", "-march=native"])
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: the torch products serve
        log.warning("CPU INT4 kernels not built (%s: %s); the torch products serve", type(e).__name__,
                    (str(e).splitlines() or [""])[0])
        return TORCH_INT4
    log.info("CPU INT4 kernels ready in %.1f s", time.perf_counter() - t0)

    def scores(q: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return ext.int4_scores(q.contiguous(), codes, params, slots.contiguous())

    def weighted(probs: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, slots: torch.Tensor
                 ) -> torch.Tensor:
        return ext.int4_weighted(probs.contiguous(), codes, params, slots.contiguous())

    return Int4Products(scores, weighted)
