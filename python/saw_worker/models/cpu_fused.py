"""The decoder layer's elementwise ops on the CPU through the native kernels (cpu-kernels/src/fused.rs): RMSNorm,
residual add + RMSNorm, q/k norm + RoPE, SiLU-and-mul, each one call of a few us in place of 2-7 torch ops (~2 ms
off a smollm2-135m decode step: bench/results/cpu-fused-2026-12-04). The functions take what saw_kernels/fused.py
(the CUDA kernels) takes and return what it returns, so the decoder has one fused path (decoder.fused_ops picks
the module); unlike those, `add_rms_norm` and `qk_norm_rope` work in place: they consume their inputs (the decoder
never reads them again), saving a copy and an allocation per call. fp32 math, one rounding to the activation
dtype; the torch path is the spec (tests/worker/test_cpu_fused.py holds them to each other)."""

from __future__ import annotations

import torch
from torch import Tensor

from saw_worker import native
from saw_worker.native import tensor

_rms_norm = native.op("cpu_rms_norm")
_qk_norm_rope = native.op("cpu_qk_norm_rope")
_silu_mul = native.op("cpu_silu_mul")
ACTIVATIONS = (torch.bfloat16, torch.float32)


def available() -> bool:
    return _rms_norm is not None and _qk_norm_rope is not None and _silu_mul is not None


def _common(x: Tensor) -> dict[str, int]:
    if x.dtype not in ACTIVATIONS:
        raise ValueError(f"the CPU fused ops take bf16 or fp32 activations, got {x.dtype}")
    return {"act_f32": int(x.dtype == torch.float32), "threads": torch.get_num_threads()}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """F.rms_norm(x, weight.shape, weight, eps) for x [..., H] (fp32 statistics and weight multiply)."""
    assert _rms_norm is not None, "needs saw_router._native (check available())"
    x = x.contiguous()
    out = torch.empty_like(x)
    _rms_norm({**tensor("x", x, x.dtype), **tensor("weight", weight, x.dtype), **tensor("out", out, x.dtype),
               **_common(x)}, eps)
    return out


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(s) * weight, s) with s = x + residual rounded to x's dtype, for contiguous x, residual [T, H]. In
    place: s is written into residual and the norm into x, which are returned."""
    assert _rms_norm is not None, "needs saw_router._native (check available())"
    if residual.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)}, residual {tuple(residual.shape)}")
    _rms_norm({**tensor("x", x, x.dtype), **tensor("residual", residual, x.dtype),
               **tensor("weight", weight, x.dtype), **_common(x)}, eps)
    return x, residual


def qk_norm_rope(qkv: Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int, q_norm_weight: Tensor | None,
                 k_norm_weight: Tensor | None, eps: float, cos_sin: Tensor, positions: Tensor,
                 k_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """qkv [T, (Hq + 2 Hkv) D] (q|k|v, contiguous) -> q [T, Hq, D], k [T, Hkv, D], views of qkv's rows: in place,
    the per-head RMSNorm (skipped when both weights are None), rotate-half RoPE from cos_sin [max_pos, 2 D] =
    (cos, cos, -sin, sin) float32 at positions [T] int64, then, with k_scale (fp32 [Hkv, D]), q times its KV
    head's lambda and k divided by it. v is not touched."""
    assert _qk_norm_rope is not None, "needs saw_router._native (check available())"
    t, d = qkv.shape[0], head_dim
    if qkv.dim() != 2 or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * d:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_q_heads}+2x{num_kv_heads} heads of {d}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must both be given or both be None")
    fields = {**tensor("qkv", qkv, qkv.dtype), "qkv_stride": qkv.shape[1], **tensor("positions", positions,
              torch.int64), **tensor("cos_sin", cos_sin, torch.float32), "q_heads": num_q_heads,
              "kv_heads": num_kv_heads, "head_dim": d, **_common(qkv)}
    if q_norm_weight is not None and k_norm_weight is not None:
        fields |= {**tensor("q_weight", q_norm_weight, qkv.dtype), **tensor("k_weight", k_norm_weight, qkv.dtype)}
    if k_scale is not None:
        fields |= tensor("k_scale", k_scale, torch.float32)
    if positions.shape != (t,):
        raise ValueError(f"positions {tuple(positions.shape)} for {t} rows")
    _qk_norm_rope(fields, eps)
    q = qkv[:, : num_q_heads * d].view(t, num_q_heads, d)
    k = qkv[:, num_q_heads * d : (num_q_heads + num_kv_heads) * d].view(t, num_kv_heads, d)
    return q, k


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [T, 2 I] (gate | up) -> silu(gate) * up [T, I] in gate_up's dtype, computed in fp32."""
    assert _silu_mul is not None, "needs saw_router._native (check available())"
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} is not [T, 2 I]")
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _silu_mul({**tensor("gate_up", gate_up, gate_up.dtype), **tensor("out", out, gate_up.dtype),
               "inter": out.shape[1], **_common(gate_up)})
    return out
