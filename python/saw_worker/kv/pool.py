"""Paged KV pool: one set of tensors per layer, addressed by token slot.

Layers named in `bf16_layers` keep their K/V at bf16 whatever the format (an accuracy option for
models whose first layers' keys quantize badly, docs/accuracy.md); the kernels take each layer's
own format, so nothing else changes.

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
    fmt: KVFormat  # this layer's format


def layer_formats(fmt: KVFormat, num_layers: int, bf16_layers: frozenset[int]) -> list[KVFormat]:
    bad = sorted(i for i in bf16_layers if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"--bf16-layers {bad} outside the model's {num_layers} layers")
    plain = KVFormat("bf16", fmt.head_dim)
    return [plain if i in bf16_layers else fmt for i in range(num_layers)]


def bytes_per_token(fmt: KVFormat, num_layers: int, num_kv_heads: int, bf16_layers: frozenset[int] = frozenset()
                    ) -> int:
    return sum(f.bytes_per_token_head() for f in layer_formats(fmt, num_layers, bf16_layers)) * num_kv_heads


class KVPool:
    def __init__(self, fmt: KVFormat, num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
                 device: torch.device, bf16_layers: frozenset[int] = frozenset()) -> None:
        if num_pages < 2:
            raise ValueError("KV budget too small: it must hold at least two pages")
        self.fmt = fmt
        self.formats = layer_formats(fmt, num_layers, bf16_layers)
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_layers = num_layers
        slots, d = num_pages * page_size, fmt.head_dim
        # One tensor per (format, K or V) holding all layers of that format; _index maps a layer to its row.
        self._index: dict[int, int] = {}
        self._tensors: dict[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        for quantized in (False, True):
            layers = [i for i, f in enumerate(self.formats) if f.quantized == quantized]
            if not layers:
                continue
            self._index.update({layer: row for row, layer in enumerate(layers)})
            shape = (len(layers), slots, num_kv_heads)
            if quantized:
                data = dict(size=(*shape, d // 2), dtype=torch.uint8, device=device)
                params = dict(size=(*shape, 2), dtype=PARAM_DTYPE, device=device)
                self._tensors[True] = (torch.zeros(**data), torch.zeros(**data), torch.zeros(**params),
                                       torch.zeros(**params))
            else:
                data = dict(size=(*shape, d), dtype=torch.bfloat16, device=device)
                self._tensors[False] = (torch.zeros(**data), torch.zeros(**data), None, None)
        self.k_mean: torch.Tensor | None = None  # [L, Hkv, D], set by calibration
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @classmethod
    def from_budget(cls, fmt: KVFormat, num_layers: int, num_kv_heads: int, budget_bytes: int, page_size: int,
                    device: torch.device, bf16_layers: frozenset[int] = frozenset()) -> KVPool:
        per_page = bytes_per_token(fmt, num_layers, num_kv_heads, bf16_layers) * page_size
        return cls(fmt, num_layers, num_kv_heads, budget_bytes // per_page, page_size, device, bf16_layers)

    def layer(self, i: int) -> LayerCache:
        fmt = self.formats[i]
        row = self._index[i]
        k, v, kp, vp = self._tensors[fmt.quantized]
        k_mean = self.k_mean[i] if self.k_mean is not None and fmt.k_center else None
        return LayerCache(k[row], v[row], None if kp is None else kp[row], None if vp is None else vp[row], k_mean,
                          fmt)

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
