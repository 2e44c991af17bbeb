"""The attention backend on the saw_kernels Triton / Gluon kernels (CUDA): fused write, decode, extend, window.

Every saw_kernels call sits in `_kernel_attention` (and the extend step's `write_window`), so a change of the
kernels' signatures touches this block only. Decode needs no host reads of device values: its CUDA graphs
capture forward_decode as it is.
"""

from __future__ import annotations

import torch

from saw_kv.cache import LayerCache
from saw_worker.kv.backend import AttentionBackend, StepLayout
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference import WindowLayout


class TritonBackend(AttentionBackend):
    supports_cuda_graphs = True

    def __init__(self, pool: KVPool, sm_scale: float) -> None:
        super().__init__(pool, sm_scale)
        import saw_kernels  # imported lazily: it needs a GPU build of Triton

        self._kernels = saw_kernels

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        # the decode kernel stores the step's tokens into the ring itself, after reading it
        return self._kernel_attention(self._kernels, q, k, v, lay, cache, lay.window_of(cache))

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        window = lay.window_of(cache)
        out = self._kernel_attention(self._kernels, q, k, v, lay, cache, window)
        if window is not None:  # after attention: the step read the ring as it was before its tokens
            assert cache.ring_k is not None and cache.ring_v is not None
            self._kernels.write_window(k, v, window.slots, cache.ring_k, cache.ring_v)
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
