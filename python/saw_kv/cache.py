"""One layer's paged KV cache as the kernels take it: the bundle the worker's pool builds, the kernel tests and
the benchmarks allocate, and the torch reference reads (so neither side imports the other's internals for it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saw_kv.formats import KVFormat


@dataclass(frozen=True, eq=False)
class LayerCache:
    """One layer's view of the paged pool, in the layout the kernels take (docs/kernels.md).

    slot = page * page_size + offset. Frozen and compared by identity: the kernels keep what they derive from
    a cache (the (scale, lo) words, the Hadamard block) per object, so build one per layer and reuse it."""

    k: torch.Tensor  # bf16 [slots, Hkv, D] or uint8 [slots, Hkv, D/2]
    v: torch.Tensor
    fmt: KVFormat  # this layer's format
    page_size: int  # tokens per page (a power of two)
    k_params: torch.Tensor | None = None  # fp16 [slots, Hkv, 2] = (scale, lo); None for bf16
    v_params: torch.Tensor | None = None
    # fp32 [Hkv, D], subtracted from K before quantization (--k-center; None: nothing is subtracted); with
    # --k-scale the model hands the cache k / lambda (DecoderLayer.k_scale), and this is the mean of that
    k_mean: torch.Tensor | None = None
    # bf16 [rows, S + W, Hkv, D]: raw K, V of each request's sinks and newest tokens (fmt.window; else None)
    ring_k: torch.Tensor | None = None
    ring_v: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]
