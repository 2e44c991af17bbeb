"""Torch reference of the paged-cache operations: the CPU path of the engine and the definition the
Triton kernels are checked against.

Without a window, attention here reads keys and values back from the cache, new tokens included, so
a request's numbers do not depend on how its prompt was chunked or whether it was recomputed after
preemption. (The Triton extend kernel attends to new tokens at bf16 instead, as issue 4 asks.)
With a window (formats.py), a step reads the request's sinks and the W tokens before its new ones from
the request's ring and the new ones as computed, all at bf16, and only the tokens between from the INT4
pages, as the kernels do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saw_kv.cache import LayerCache
from saw_kv.formats import (
    KVFormat,
    decode_k,
    decode_o,
    dequantize_int4,
    encode_k,
    encode_v,
    quantize_int4,
)


@dataclass
class WindowLayout:
    """Where a step's requests keep their bf16 window (all on the pool's device)."""

    rows: torch.Tensor  # int32 [B]: each request's ring row
    lens: torch.Tensor  # int32 [B]: window tokens before the step's new ones (<= W)
    quant_lens: torch.Tensor  # int32 [B]: where the INT4 reads end (prefix_lens - lens)
    slots: torch.Tensor  # int64 [T]: flat ring slot each new token is kept at (a sink's, a window's, or the dump row's)
    sinks: torch.Tensor  # int32 [B]: sink tokens held in the ring (<= S): where the INT4 reads begin


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache: LayerCache, fmt: KVFormat) -> None:
    """Store new K, V [T, Hkv, D] at slots [T]; negative slots are padding and skipped."""
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    if not fmt.quantized:
        cache.k[slots] = k.to(cache.k.dtype)
        cache.v[slots] = v.to(cache.v.dtype)
        return
    for data, params, x in ((cache.k, cache.k_params, encode_k(k, fmt, cache.k_mean)),
                            (cache.v, cache.v_params, encode_v(v, fmt))):
        packed, p = quantize_int4(x)
        data[slots] = packed
        params[slots] = p


def write_window_ref(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, ring_k: torch.Tensor,
                     ring_v: torch.Tensor) -> None:
    """Keep new K, V [T, Hkv, D] raw in the rings at flat slots [T] (WindowLayout.slots)."""
    ring_k.view(-1, *ring_k.shape[2:])[slots] = k.to(ring_k.dtype)
    ring_v.view(-1, *ring_v.shape[2:])[slots] = v.to(ring_v.dtype)


def read_rows(data: torch.Tensor, params: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    """Stored rows at slots (any shape) as fp32, in the stored (scaled / centered / rotated) space."""
    if params is None:
        return data[slots].float()
    return dequantize_int4(data[slots], params[slots])


def slots_of(page_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slot of each position: page_table [B, P], positions [B, N] -> [B, N] int64."""
    pages = torch.gather(page_table.long(), 1, positions // page_size)
    return pages * page_size + positions % page_size


def paged_attention_ref(q: torch.Tensor, cu_seqlens: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
                        page_size: int, cache: LayerCache, fmt: KVFormat, sm_scale: float,
                        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                        window: WindowLayout | None = None) -> torch.Tensor:
    """Causal attention of each request's newest queries over its cached tokens.

    q [T, Hq, D]: request b owns rows cu_seqlens[b]:cu_seqlens[b+1], its last n_b positions, so
    query i sits at position seq_lens[b] - n_b + i and sees positions <= its own. Decode is n_b = 1.
    With a window, new_kv holds the step's raw K, V [T, Hkv, D], and positions below sinks[b] and from
    quant_lens[b] on are read at bf16 (ring, then new_kv); before the ring is updated with this step's tokens.
    Keys and values are brought back to the model's space, so every source meets the same plain q.
    """
    num_reqs = seq_lens.numel()
    n_q = cu_seqlens[1:] - cu_seqlens[:-1]
    max_q, max_len = int(n_q.max()), int(seq_lens.max())
    hq, d = q.shape[1], q.shape[2]
    hkv = cache.k.shape[1]

    # Pad queries to [B, max_q]; row j of request b is query index j.
    j = torch.arange(max_q, device=q.device)
    q_valid = j[None, :] < n_q[:, None]
    q_rows = torch.where(q_valid, cu_seqlens[:-1, None] + j[None, :], 0)
    qp = q.float()[q_rows]  # [B, max_q, Hq, D]
    q_pos = seq_lens[:, None] - n_q[:, None] + j[None, :]

    k_pos = torch.arange(max_len, device=q.device).expand(num_reqs, max_len)
    slots = slots_of(page_table, torch.minimum(k_pos, (seq_lens[:, None] - 1).clamp(min=0)), page_size)
    keys = decode_k(read_rows(cache.k, cache.k_params, slots), fmt, cache.k_mean)  # [B, L, Hkv, D]
    values = decode_o(read_rows(cache.v, cache.v_params, slots), fmt)
    if window is not None:
        assert new_kv is not None and cache.ring_k is not None and cache.ring_v is not None
        keys, values = _with_window(keys, values, k_pos, seq_lens - n_q, cu_seqlens, new_kv, cache, window)

    group = hq // hkv
    qg = qp.view(num_reqs, max_q, hkv, group, d)
    scores = torch.einsum("bqhgd,blhd->bhgql", qg, keys) * sm_scale
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]  # [B, max_q, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # padded query rows see nothing
    out = torch.einsum("bhgql,blhd->bqhgd", probs, values).reshape(num_reqs, max_q, hq, d)
    return out[q_valid].to(q.dtype)


def _with_window(keys: torch.Tensor, values: torch.Tensor, k_pos: torch.Tensor, prefix_lens: torch.Tensor,
                 cu_seqlens: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor], cache: LayerCache,
                 window: WindowLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values [B, L, Hkv, D] (updated in place) with the sinks and positions >= quant_lens taken at bf16:
    from the ring below the prefix, from the step's own K, V at and above it. Only those (at most S + W + new)
    positions per request are gathered."""
    assert cache.ring_k is not None and cache.ring_v is not None
    n_slots, sinks = cache.ring_k.shape[1], cache.fmt.sinks
    w = n_slots - sinks
    prefix = prefix_lens.long()[:, None]
    starts = cu_seqlens[:-1].long()[:, None]
    n_new = cu_seqlens[1:].long()[:, None] - starts
    in_window = (k_pos >= window.quant_lens.long()[:, None]) & (k_pos < prefix)
    b_ring, p_ring = (in_window | (k_pos < window.sinks.long()[:, None])).nonzero(as_tuple=True)
    b_new, p_new = ((k_pos >= prefix) & (k_pos < prefix + n_new)).nonzero(as_tuple=True)
    ring_at = window.rows.long()[b_ring] * n_slots + torch.where(in_window[b_ring, p_ring], sinks + p_ring % w, p_ring)
    new_at = starts[b_new, 0] + p_new - prefix[b_new, 0]
    for rows, ring, new in ((keys, cache.ring_k, new_kv[0]), (values, cache.ring_v, new_kv[1])):
        rows[b_ring, p_ring] = ring.view(-1, *ring.shape[2:])[ring_at].float()
        # new tokens at the cache's precision, as the GPU path holds them (bf16 activations)
        rows[b_new, p_new] = new[new_at].to(ring.dtype).float()
    return keys, values
