"""Simulated KV formats for one-sequence prefill: the worker's reference math (formats.py) plus the
options under study, applied as quantize -> dequantize of K and V before an fp32 causal attention.

Why a simulation and not the engine: the options (attention-sink tokens kept exact, bf16 scales,
V centering, K groups, INT8 K, per-layer exceptions) do not exist in the worker, and a single causal
prefill where every token reads its K/V back from the quantized cache is exactly what the worker's
CPU reference does (kv/reference.py), so the standard formats give the same numbers (checked by
sweep.py --check-engine). K is de-rotated after dequantization: R is orthogonal, so (Rq).(Rk^) = q.(R k^).
Centering is not added back: softmax ignores the constant q.mu shift (ARCHITECTURE §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from saw_worker.kv.formats import EPS, rotate


@dataclass(frozen=True)
class SimFormat:
    name: str  # bf16 | int4 | int4-bdr
    order: int = 64
    rotate_v: bool = False
    k_center: bool = False
    param_dtype: torch.dtype = torch.float16
    sink: int = 0  # first tokens kept in bf16
    v_center: bool = False  # subtract the V mean, add it back to the output once per head
    k_group: int = 0  # 0 = whole row; else min/scale per group of k_group channels (K only)
    k_bits: int = 4
    exact_layers: frozenset[int] = field(default_factory=frozenset)  # layers kept in bf16
    exact_k_layers: frozenset[int] = field(default_factory=frozenset)  # layers whose K is kept in bf16

    def bytes_per_token_head(self, d: int, num_layers: int = 1) -> float:
        """K + V bytes of one (token, KV head), averaged over layers (bf16 exceptions included; the
        sinks' cost is per request, not per token, and left out)."""
        if self.name == "bf16":
            return 4.0 * d
        groups = d // self.k_group if self.k_group else 1
        k, v = d * self.k_bits / 8 + 4 * groups, d / 2 + 4
        n_full, n_k = len(self.exact_layers), len(self.exact_k_layers - self.exact_layers)
        n_q = num_layers - n_full - n_k
        return (n_q * (k + v) + n_full * 4 * d + n_k * (2 * d + v)) / max(num_layers, n_full + n_k)


def fake_quant(x: torch.Tensor, bits: int, group: int, param_dtype: torch.dtype) -> torch.Tensor:
    """Token-wise asymmetric min/max quantization of rows x[..., D] (groups of `group`), dequantized."""
    d = x.shape[-1]
    g = group or d
    xs = x.float().reshape(*x.shape[:-1], d // g, g)
    levels = 2**bits - 1
    lo = xs.amin(-1, keepdim=True)
    scale = torch.clamp(xs.amax(-1, keepdim=True) - lo, min=EPS) / levels
    scale, lo = scale.to(param_dtype).float(), lo.to(param_dtype).float()
    q = torch.clamp(torch.round((xs - lo) / scale), 0, levels)
    return (q * scale + lo).reshape(x.shape)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


class SimAttention:
    """Attention callable for DecoderLM: positions 0..T-1 of one sequence."""

    def __init__(self, fmt: SimFormat, sm_scale: float, k_mean: torch.Tensor | None = None,
                 v_mean: torch.Tensor | None = None) -> None:
        self.fmt, self.sm_scale = fmt, sm_scale
        self.k_mean, self.v_mean = k_mean, v_mean
        self.observer = None  # callable(layer_id, k, v) for statistics

    def _kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fmt
        if f.name == "bf16" or layer in f.exact_layers:
            return bf16(k), bf16(v)
        kc = k.float()
        if f.k_center and self.k_mean is not None:
            kc = kc - self.k_mean[layer]
        rot = f.name == "int4-bdr"
        kh = fake_quant(rotate(kc, f.order) if rot else kc, f.k_bits, f.k_group, f.param_dtype)
        kh = rotate(kh, f.order) if rot else kh
        vx = v.float()
        vm = self.v_mean[layer] if f.v_center and self.v_mean is not None else None
        if vm is not None:
            vx = vx - vm
        vx = rotate(vx, f.order) if f.rotate_v else vx
        vh = fake_quant(vx, 4, 0, f.param_dtype)
        vh = rotate(vh, f.order) if f.rotate_v else vh
        if vm is not None:
            vh = vh + vm  # == adding vm to the output once: attention weights sum to 1
        if layer in f.exact_k_layers:
            kh = bf16(kc)
        if f.sink:  # sinks stay in the same (centered) space as the other keys
            kh[: f.sink] = bf16(kc[: f.sink])
            vh[: f.sink] = bf16(v[: f.sink])
        return kh, vh

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(layer_id, k, v)
        kh, vh = self._kv(layer_id, k, v)
        group = q.shape[1] // k.shape[1]
        qh = q.float().transpose(0, 1)
        kh = kh.repeat_interleave(group, 1).transpose(0, 1)
        vh = vh.repeat_interleave(group, 1).transpose(0, 1)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.sm_scale)
        return o.transpose(0, 1).to(q.dtype)
