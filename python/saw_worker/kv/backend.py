"""The attention the models call: writes new K/V into the paged pool, then attends over it.

The engine sets a StepLayout before each forward; models only see q, k, v. On CUDA the Triton
kernels of saw_kernels do the work; elsewhere the torch reference does. A format's K scale is not
applied here: the model hands over q lambda and k / lambda already (DecoderLayer.k_scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saw_worker.kv.pool import KVPool, LayerCache
from saw_worker.kv.reference import WindowLayout, paged_attention_ref, write_kv_ref, write_window_ref


@dataclass
class StepLayout:
    """Where this step's tokens go and what each request sees (all on the pool's device)."""

    slots: torch.Tensor  # int64 [T]: cache slot of each new token (-1 = padding)
    cu_seqlens: torch.Tensor  # int32 [B+1]: new-token rows of each request
    seq_lens: torch.Tensor  # int32 [B]: tokens in cache after this step, new ones included
    prefix_lens: torch.Tensor  # int32 [B]: tokens cached before this step
    page_table: torch.Tensor  # int32 [B, max_pages]
    is_decode: bool  # every request adds exactly one token
    max_new_len: int
    max_prefix_len: int | None = None  # host copy of prefix_lens.max(), when known
    window: WindowLayout | None = None  # set when the pool keeps a bf16 window


class PagedAttention:
    def __init__(self, pool: KVPool, sm_scale: float, use_kernels: bool) -> None:
        self.pool = pool
        self.sm_scale = sm_scale
        self.layout: StepLayout | None = None
        # sees each layer's new q and K (calibration)
        self.observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self._kernels = None
        if use_kernels:
            import saw_kernels  # imported lazily: it needs a GPU build of Triton

            self._kernels = saw_kernels
        self.refresh()

    def refresh(self) -> None:
        """Re-take per-layer views (after calibration sets the K means)."""
        self._layers: list[LayerCache] = [self.pool.layer(i) for i in range(self.pool.num_layers)]

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay, cache = self.layout, self._layers[layer_id]
        fmt = cache.fmt
        assert lay is not None, "StepLayout not set"
        if self.observer is not None:
            self.observer(layer_id, q, k)
        window = lay.window if cache.ring_k is not None else None
        kern = self._kernels
        if kern is None:
            write_kv_ref(k, v, lay.slots, cache, fmt)
            out = paged_attention_ref(q, lay.cu_seqlens, lay.seq_lens, lay.page_table, self.pool.page_size, cache,
                                      fmt, self.sm_scale, (k, v), window)
        else:
            out = self._kernel_attention(kern, q, k, v, lay, cache, window)
        # after attention: the step read the ring as it was before its tokens (a decode kernel keeps them itself)
        if window is not None and (kern is None or not lay.is_decode):
            assert cache.ring_k is not None and cache.ring_v is not None
            (write_window_ref if kern is None else kern.write_window)(k, v, window.slots, cache.ring_k, cache.ring_v)
        return out

    def _kernel_attention(self, kern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # noqa: ANN001
                          lay: StepLayout, cache: LayerCache, window: WindowLayout | None) -> torch.Tensor:
        fmt = cache.fmt
        ring = None
        if window is not None:
            ring = kern.Ring(window.rows, window.lens, lay.prefix_lens, window.sinks if fmt.sinks else None)
        # Decode steps hand q to the write launch: for int4-bdr it comes back rotated, once per step
        # instead of once per decode split.
        q_dec = kern.write_kv(k, v, lay.slots, cache, q if lay.is_decode else None)
        if lay.is_decode:
            seq_lens = lay.seq_lens if window is None else window.quant_lens
            return kern.decode_attention(q_dec, cache, lay.page_table, seq_lens, self.sm_scale,
                                         q_rotated=fmt.rotated, ring=ring, q_plain=q, k_new=k, v_new=v,
                                         keep_slots=None if window is None else window.slots)
        prefix_lens = lay.prefix_lens if window is None else window.quant_lens
        return kern.extend_attention(q, k, v, lay.cu_seqlens, prefix_lens, cache, lay.page_table, self.sm_scale,
                                     max_new_len=lay.max_new_len, max_prefix_len=lay.max_prefix_len, ring=ring)
