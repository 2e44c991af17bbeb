"""The attention backend on the torch reference (kv/reference.py): the CPU path, and the definition the
kernels are checked against. One routine serves decode and extend steps; it reads device values on the host
(`plan_attention` sizes its padding from them), so it cannot be captured in a CUDA graph. The step's plan (its
indices and masks, the same in every layer) is built at the first layer and reused by the others."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saw_kv.cache import LayerCache
from saw_worker.kv.backend import AttentionBackend, StepLayout
from saw_worker.kv.reference import AttentionPlan, attend_ref, plan_attention, write_kv_ref, write_window_ref

if TYPE_CHECKING:
    from saw_worker.engine.model_runner import HostBatch


class ReferenceBackend(AttentionBackend):
    _plans: tuple[StepLayout, dict[bool, AttentionPlan]] | None = None

    # A new step, or new contents in the graph buffers behind the same layout: the plans are stale.
    def prepare(self, h: HostBatch) -> None:
        super().prepare(h)
        self._plans = None

    def prepare_for_capture(self, batch_size: int) -> None:
        super().prepare_for_capture(batch_size)
        self._plans = None

    def prepare_for_replay(self, h: HostBatch, batch_size: int) -> None:
        super().prepare_for_replay(h, batch_size)
        self._plans = None

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        return self._attend(q, k, v, cache, lay)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        return self._attend(q, k, v, cache, lay)

    def _plan(self, lay: StepLayout, cache: LayerCache) -> AttentionPlan:
        """This step's plan for a layer with (or without) a ring: layers differ only in that."""
        if self._plans is None or self._plans[0] is not lay:
            self._plans = (lay, {})
        window = lay.window_of(cache)
        plans, ring = self._plans[1], window is not None
        if ring not in plans:
            plans[ring] = plan_attention(lay.cu_seqlens, lay.seq_lens, lay.page_table, self.pool.page_size,
                                         lay.slots, window, cache.fmt.ring_slots, cache.fmt.sinks)
        return plans[ring]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                lay: StepLayout) -> torch.Tensor:
        plan = self._plan(lay, cache)
        write_kv_ref(k, v, lay.slots, cache, cache.fmt, plan.keep)
        out = attend_ref(q, plan, cache, cache.fmt, self.sm_scale, (k, v))
        window = lay.window_of(cache)
        if window is not None:  # after attention: the step read the ring as it was before its tokens
            assert cache.ring_k is not None and cache.ring_v is not None
            write_window_ref(k, v, window.slots, cache.ring_k, cache.ring_v)
        return out
