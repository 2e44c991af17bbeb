"""The attention backend on the torch reference (kv/reference.py): the CPU path, and the definition the
kernels are checked against. One routine serves decode and extend steps; it reads device values on the host
(`paged_attention_ref` sizes its padding from them), so it cannot be captured in a CUDA graph."""

from __future__ import annotations

import torch

from saw_kv.cache import LayerCache
from saw_worker.kv.backend import AttentionBackend, StepLayout
from saw_worker.kv.reference import paged_attention_ref, write_kv_ref, write_window_ref


class ReferenceBackend(AttentionBackend):
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        return self._attend(q, k, v, cache, lay)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        return self._attend(q, k, v, cache, lay)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                lay: StepLayout) -> torch.Tensor:
        window = lay.window_of(cache)
        write_kv_ref(k, v, lay.slots, cache, cache.fmt)
        out = paged_attention_ref(q, lay.cu_seqlens, lay.seq_lens, lay.page_table, self.pool.page_size, cache,
                                  cache.fmt, self.sm_scale, (k, v), window)
        if window is not None:  # after attention: the step read the ring as it was before its tokens
            assert cache.ring_k is not None and cache.ring_v is not None
            write_window_ref(k, v, window.slots, cache.ring_k, cache.ring_v)
        return out
