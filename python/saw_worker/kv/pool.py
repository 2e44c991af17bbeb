"""Paged KV pool: one set of tensors per layer, addressed by token slot.

slot = page_id * page_size + offset. A request owns whole pages; its page table maps position p
to slot page_table[p // page_size] * page_size + p % page_size. Page 0 is never handed out: padded
batch rows (CUDA graphs) point at it, so their writes land somewhere harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saw_worker.kv.formats import PARAM_DTYPE, KVFormat


@dataclass
class LayerCache:
    """One layer's view of the pool, in the layout the kernels take."""

    k: torch.Tensor  # bf16 [slots, Hkv, D] or uint8 [slots, Hkv, D/2]
    v: torch.Tensor
    k_params: torch.Tensor | None  # fp16 [slots, Hkv, 2] = (scale, lo); None for bf16
    v_params: torch.Tensor | None
    k_mean: torch.Tensor | None  # fp32 [Hkv, D], subtracted from K before quantization (--k-center)


def bytes_per_token(fmt: KVFormat, num_layers: int, num_kv_heads: int) -> int:
    return fmt.bytes_per_token_head() * num_layers * num_kv_heads


class KVPool:
    def __init__(self, fmt: KVFormat, num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
                 device: torch.device) -> None:
        if num_pages < 2:
            raise ValueError("KV budget too small: it must hold at least two pages")
        self.fmt = fmt
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_layers = num_layers
        slots, d = num_pages * page_size, fmt.head_dim
        shape = (num_layers, slots, num_kv_heads)
        if fmt.quantized:
            data = dict(size=(*shape, d // 2), dtype=torch.uint8, device=device)
            params = dict(size=(*shape, 2), dtype=PARAM_DTYPE, device=device)
            self._k, self._v = torch.zeros(**data), torch.zeros(**data)
            self._k_params, self._v_params = torch.zeros(**params), torch.zeros(**params)
        else:
            data = dict(size=(*shape, d), dtype=torch.bfloat16, device=device)
            self._k, self._v = torch.zeros(**data), torch.zeros(**data)
            self._k_params = self._v_params = None
        self.k_mean: torch.Tensor | None = None  # [L, Hkv, D], set by calibration
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @classmethod
    def from_budget(cls, fmt: KVFormat, num_layers: int, num_kv_heads: int, budget_bytes: int, page_size: int,
                    device: torch.device) -> KVPool:
        per_page = bytes_per_token(fmt, num_layers, num_kv_heads) * page_size
        return cls(fmt, num_layers, num_kv_heads, budget_bytes // per_page, page_size, device)

    def layer(self, i: int) -> LayerCache:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[i]

        return LayerCache(self._k[i], self._v[i], pick(self._k_params), pick(self._v_params), pick(self.k_mean))

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        return (self.num_pages - 1 - len(self._free)) * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages, or None (and nothing taken) when the pool cannot supply them."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
