"""The CPU attention backend: decode steps run saw's native CPU kernel (cpu-kernels/, built into the wheel's
saw_router._native), one call per layer that stores the new K/V, attends and keeps the ring, in place of the torch
reference's ~60 small ops; extend (prefill) steps run the reference (ReferenceBackend), which is the kernel's spec
(tests/worker/test_cpu_backend.py holds them to each other). The same kernel runs inside the native decoder layers
(models/cpu_layer.py), which take the step's layout and each layer's cache from here as native handles."""

from __future__ import annotations

from typing import Any

import torch

from saw_kv.cache import LayerCache
from saw_worker import native
from saw_worker.kv.backend import StepLayout
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference_backend import ReferenceBackend
from saw_worker.native import rows, tensor

cpu_decode_attention = native.op("cpu_decode_attention")
_CpuStep = native.op("CpuStep")
_CpuKv = native.op("CpuKv")
ACTIVATIONS = (torch.bfloat16, torch.float32)


def native_available() -> bool:
    return cpu_decode_attention is not None


class CpuBackend(ReferenceBackend):
    """ReferenceBackend with decode steps on the native kernel."""

    def __init__(self, pool: KVPool, sm_scale: float) -> None:
        super().__init__(pool, sm_scale)
        self._step: tuple[StepLayout, dict[str, int]] | None = None
        self._caches: dict[int, tuple[LayerCache, dict[str, int]]] = {}
        self._native_step: tuple[StepLayout, Any] | None = None
        self._native_kv: dict[int, tuple[LayerCache, Any]] = {}
        # the worker's threads (builder sets them before the backend is built); decode steps may run torch on fewer
        self._threads = torch.get_num_threads()

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        assert cpu_decode_attention is not None, "CpuBackend needs saw_router._native (builder checks it)"
        if q.dtype not in ACTIVATIONS:
            raise ValueError(f"the CPU decode kernel takes bf16 or fp32 activations, got {q.dtype}")
        out = torch.empty(q.shape, dtype=q.dtype)
        fields = {**self._step_fields(lay), **self._cache_fields(cache),
                  **rows("q", q, q.dtype), **rows("k", k, q.dtype), **rows("v", v, q.dtype),
                  **tensor("out", out, q.dtype), "q_heads": q.shape[1], "act_f32": int(q.dtype == torch.float32),
                  "threads": self._threads}
        # the tensors behind the addresses stay referenced here until the call returns
        cpu_decode_attention(fields, self.sm_scale)
        return out

    def native_step(self) -> Any | None:
        """The prepared step's layout as a native handle for the native layers (models/cpu_layer.py), made once per
        step; None unless it is a decode step, or while an observer watches each layer's q and K (calibration)."""
        lay = self._layout
        if lay is None or not lay.is_decode or self.observer is not None or _CpuStep is None:
            return None
        if self._native_step is None or self._native_step[0] is not lay:
            self._native_step = (lay, _CpuStep(self._step_fields(lay), self.sm_scale, lay))
        return self._native_step[1]

    def native_kv(self, layer_id: int) -> Any:
        """Layer layer_id's cache as a native handle, once per LayerCache (as _cache_fields)."""
        assert _CpuKv is not None, "native_kv follows a native_step"
        cache = self.pool.layer(layer_id)
        kept = self._native_kv.get(layer_id)
        if kept is None or kept[0] is not cache:
            kept = self._native_kv[layer_id] = (cache, _CpuKv(self._cache_fields(cache), cache))
        return kept[1]

    def _step_fields(self, lay: StepLayout) -> dict[str, int]:
        """What every layer of the step shares: the layout, once per step."""
        if self._step is None or self._step[0] is not lay:
            fields = {**tensor("slots", lay.slots, torch.int64), **tensor("seq_lens", lay.seq_lens, torch.int32),
                      **tensor("page_table", lay.page_table, torch.int32), "table_width": lay.page_table.shape[1],
                      "page_size": self.pool.page_size}
            if lay.window is not None:
                w = lay.window
                fields |= {**tensor("ring_rows", w.rows, torch.int32), **tensor("quant_lens", w.quant_lens,
                                                                                  torch.int32),
                           **tensor("held_sinks", w.sinks, torch.int32),
                           **tensor("write_slots", w.slots, torch.int64)}
            self._step = (lay, fields)
        return self._step[1]

    def _cache_fields(self, cache: LayerCache) -> dict[str, int]:
        """A layer's cache tensors and format, once per LayerCache (the pool keeps one per layer)."""
        kept = self._caches.get(id(cache))
        if kept is None or kept[0] is not cache:
            fmt = cache.fmt
            fields = {"kv_heads": cache.k.shape[1], "head_dim": fmt.head_dim, "int4": int(fmt.quantized),
                      "hadamard_order": fmt.hadamard_order if fmt.rotated else 0, "rotate_v": int(fmt.rotate_v),
                      "sinks": fmt.sinks, "window": fmt.window}
            if fmt.quantized:
                assert cache.k_params is not None and cache.v_params is not None
                fields |= {**tensor("cache_k", cache.k, torch.uint8), **tensor("cache_v", cache.v, torch.uint8),
                           **tensor("k_params", cache.k_params, torch.float16),
                           **tensor("v_params", cache.v_params, torch.float16)}
                if cache.k_mean is not None:
                    fields |= tensor("k_mean", cache.k_mean, torch.float32)
            else:
                fields |= {**tensor("cache_k", cache.k, torch.bfloat16),
                           **tensor("cache_v", cache.v, torch.bfloat16)}
            if cache.ring_k is not None and cache.ring_v is not None:
                fields |= {**tensor("ring_k", cache.ring_k, torch.bfloat16),
                           **tensor("ring_v", cache.ring_v, torch.bfloat16)}
            kept = self._caches[id(cache)] = (cache, fields)
        return kept[1]
