"""A CPU decode step's decoder layers as one native call each (cpu-kernels/src/layer.rs) instead of ~10 (the
projections, the fused elementwise ops, the attention), each of those with 10-25 us of Python, pyo3 and torch
around a few us of work: ~120 calls for smollm2-135m's 30 layers.

`DecoderLayer.forward` stays the spec: the native layer runs the same kernels in the same order with the same
roundings (tests/worker/test_cpu_layer.py holds the two to each other, bit for bit). It takes the layers whose every
projection is held as GGUF blocks (`PackedBlocks`), bf16 or float32 activations, decode steps of up to
`BLOCKS_MAX_ROWS` rows, and an attention that hands over the step's native KV handles (kv/cpu_backend.py's
`native_step`, `native_kv`): every bf16 / INT4 / INT4-BDR format, rings and K scales included. Anything else runs
the op-by-op path; where the model is what is refused, a log line says why, once.

The layers' weights are native handles (`CpuLayer`) made on the first step from the tensors the Python path reads
(the same memory: in-place weight writes reach both) and kept: `DecoderLM` drops them where it replaces packed
weights, and a layer's handle is remade where its K scale is set anew (calibration).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor

from .. import native
from ..native import tensor
from .linear import BLOCKS_MAX_ROWS, PackedBlocks

if TYPE_CHECKING:
    from .decoder import DecoderLayer, DecoderLM

log = logging.getLogger("saw_worker")

_CpuLayer = native.op("CpuLayer")


class NativeAttention(Protocol):
    """What kv/cpu_backend.py's CpuBackend hands the native layers: the prepared decode step's layout (None where the
    step is not one the native layers take) and a layer's KV cache, as native handles."""

    def native_step(self) -> Any | None: ...

    def native_kv(self, layer_id: int) -> Any: ...


def available() -> bool:
    return _CpuLayer is not None


def unsupported(model: DecoderLM) -> str | None:
    """Why the model's layers cannot run as native calls; None where they can."""
    if _CpuLayer is None:
        return "saw_router._native has no CpuLayer (not built, or older than it)"
    w = model.embed_weight
    if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32):
        return f"the native layers take bf16 or float32 CPU models, not {w.dtype} on {w.device}"
    for layer in model.layers:
        if not layer.on_blocks():
            return f"layer {layer.layer_id}: not every projection is held as GGUF blocks the native matvec reads"
        norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.q_norm, layer.k_norm]
        if len({n.eps for n in norms if n is not None}) != 1:
            return f"layer {layer.layer_id}: norms of different eps"
    return None


class NativeLayers:
    """The model's layers as native handles, each with the K scale it was made with."""

    def __init__(self, model: DecoderLM) -> None:
        self.cos_sin: Tensor = model.cos_sin
        self.dtype, self.hidden = model.embed_weight.dtype, model.config.hidden_size  # what the handles read
        self.handles = [self._handle(layer) for layer in model.layers]
        self.k_scales = [layer.k_scale for layer in model.layers]

    def run(self, model: DecoderLM, x: Tensor, positions: Tensor, step: Any,
            attention: NativeAttention) -> tuple[Tensor, Tensor]:
        """The layers on x [T, H] (the embeddings; consumed): (the last layer's output, the stream before it), as
        the op-by-op loop over DecoderLayer.forward returns them."""
        for i, layer in enumerate(model.layers):
            if layer.k_scale is not self.k_scales[i]:
                self.handles[i], self.k_scales[i] = self._handle(layer), layer.k_scale
        if x.dtype != self.dtype or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x: needs CPU {self.dtype} [T, {self.hidden}], got {x.dtype} {tuple(x.shape)}")
        if positions.dtype != torch.int64 or not positions.is_contiguous() or positions.shape != x.shape[:1]:
            raise ValueError(f"positions {positions.dtype} {tuple(positions.shape)} for {x.shape[0]} rows")
        x = x.contiguous()
        residual = torch.empty_like(x)
        args = (x.data_ptr(), residual.data_ptr(), positions.data_ptr(), x.shape[0])
        for i, (layer, handle) in enumerate(zip(model.layers, self.handles, strict=True)):
            handle.decode(*args, i == 0, step, attention.native_kv(layer.layer_id))
        return x, residual

    def _handle(self, layer: DecoderLayer) -> Any:
        assert _CpuLayer is not None
        dt = layer.input_layernorm.weight.dtype
        fields = {"act_f32": int(dt == torch.float32), "hidden": layer.down_weight.shape[0],
                  "inter": layer.down_weight.shape[1], "q_heads": layer.nq, "kv_heads": layer.nkv,
                  "head_dim": layer.d, **tensor("cos_sin", self.cos_sin, torch.float32)}
        keep: list[object] = [self.cos_sin]
        weights = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
                   "qkv_bias": layer.qkv_bias, "q_norm": None if layer.q_norm is None else layer.q_norm.weight,
                   "k_norm": None if layer.k_norm is None else layer.k_norm.weight}
        for name, t in weights.items():
            if t is not None:
                fields |= tensor(name, t, dt)
                keep.append(t)
        if layer.k_scale is not None:
            fields |= tensor("k_scale", layer.k_scale, torch.float32)
            keep.append(layer.k_scale)
        # the projections' fields under the prefixes cpu-kernels/src/layer.rs reads: qkv_, o_, gate_up_, down_
        for attr, p in layer.packed.items():
            assert isinstance(p, PackedBlocks), "unsupported() checks it"
            fields |= {attr.removesuffix("weight") + name: value for name, value in p.fields.items()}
            keep.append(p)
        fields["threads"] = fields["qkv_threads"]  # the worker's, as for the op-by-op matvecs and attention
        return _CpuLayer(fields, layer.input_layernorm.eps, keep)


def decode(model: DecoderLM, x: Tensor, positions: Tensor, attention: object) -> tuple[Tensor, Tensor] | None:
    """The model's layers on a decode step's embeddings x as native calls, or None where this step or model is not
    one they take (the caller runs the op-by-op path)."""
    if getattr(attention, "native_step", None) is None or x.shape[0] > BLOCKS_MAX_ROWS:
        return None
    native_attention = cast(NativeAttention, attention)
    step = native_attention.native_step()
    if step is None:
        return None
    if model.native_layers is None:
        if model.native_refused is not None:
            return None
        reason = unsupported(model)
        if reason is not None:
            log.info("CPU decode runs the layers op by op: %s", reason)
            model.native_refused = reason
            return None
        model.native_layers = NativeLayers(model)
    return model.native_layers.run(model, x, positions, step, native_attention)
