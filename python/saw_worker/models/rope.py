"""Rotary position embedding: a precomputed cos/sin cache and the NEOX (rotate-half) application.

HF Llama/Qwen checkpoints use rotate-half over the two halves of each head; llama.cpp's Q/K row
permutation (interleaved pairs) is undone at GGUF load, so one convention serves every model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def inv_freq(head_dim: int, theta: float, scaling: dict | None, device: torch.device | None = None) -> Tensor:
    """Per-pair inverse frequencies [head_dim/2], float32, after rope scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return freqs
    if kind == "linear":
        return freqs / float(scaling["factor"])  # type: ignore[index]
    if kind == "llama3":
        return _llama3(freqs, scaling)  # type: ignore[arg-type]
    if kind == "freq_factors":  # GGUF `rope_freqs.weight`: llama.cpp divides each frequency by its factor
        return freqs / torch.tensor(scaling["factors"], dtype=torch.float32, device=device)  # type: ignore[index]
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def _llama3(freqs: Tensor, s: dict) -> Tensor:
    # Same piecewise rule as transformers' _compute_llama3_parameters.
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freqs
    out = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def cos_sin_cache(
    head_dim: int, theta: float, scaling: dict | None, max_positions: int, device: torch.device | None = None
) -> Tensor:
    """[max_positions, 2 * head_dim] float32: (cos, cos) then (-sin, sin), laid out so that
    apply_rope is one multiply and one fused multiply-add over the whole head."""
    f = inv_freq(head_dim, theta, scaling, device)
    t = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    angles = torch.outer(t, f)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos, -sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D]; cos = (cos, cos), sin = (-sin, sin), [T, 1, D] in x's dtype.

    Rotate-half as HF's apply_rotary_pos_emb: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in
    three kernels (swap halves, multiply, multiply-add) instead of seven."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (x2, x1), contiguous copy
    return torch.addcmul(x * cos, swapped, sin)
