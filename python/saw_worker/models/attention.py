"""The seam between a model and the engine's KV backend."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Attention(Protocol):
    """q [T, Hq, D], k/v [T, Hkv, D] (after q/k-norm and RoPE) -> o [T, Hq, D].

    The engine's implementation owns the paged KV cache and knows the current batch layout
    (which tokens belong to which request); models know nothing about caches or batches.
    v is a strided view into the fused qkv output (last dim contiguous, token stride (Hq + 2 Hkv) * D), and so
    are q and k on the CPU's fused path (models/cpu_fused.py; contiguous elsewhere), so kernels should take their
    strides or call .contiguous().
    """

    def __call__(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class FullCausalAttention:
    """Reference backend for tests and offline scripts: each forward call is one whole sequence,
    attended causally with SDPA. With `cache=True` it keeps K/V per layer so a caller can feed one
    token at a time (greedy generation) after a prefill; `reset()` starts a new sequence."""

    def __init__(self, num_heads: int, num_kv_heads: int, cache: bool = False) -> None:
        self.group = num_heads // num_kv_heads
        self.cache = cache
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def reset(self) -> None:
        self.kv.clear()

    def __call__(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        past = 0
        if self.cache:
            if layer_id in self.kv:
                pk, pv = self.kv[layer_id]
                past = pk.shape[0]
                k, v = torch.cat([pk, k]), torch.cat([pv, v])
            self.kv[layer_id] = (k, v)
        # [T, H, D] -> [H, T, D]; GQA by repeating K/V heads.
        qh = q.transpose(0, 1)
        kh = k.transpose(0, 1).repeat_interleave(self.group, dim=0)
        vh = v.transpose(0, 1).repeat_interleave(self.group, dim=0)
        t, s = q.shape[0], k.shape[0]
        # Query i (absolute position past + i) sees keys 0..past + i.
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=past)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return o.transpose(0, 1)
