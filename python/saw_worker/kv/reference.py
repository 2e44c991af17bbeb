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
from saw_kv.formats import KVFormat, decode_o, encode_k, encode_v, quantize_int4, rotate


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
    The result is attention over the rows brought back to the model's space (decode_k, decode_o), computed
    where the rows are stored: q meets INT4 codes as R q (q . decode_k(x) = R q . x + q . mu) and the weighted
    codes are rotated back once per query, so no cached row is dequantized into a float K or V.
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
    qg = q.float()[q_rows].view(num_reqs, max_q, hkv, hq // hkv, d)
    q_pos = seq_lens[:, None] - n_q[:, None] + j[None, :]

    k_pos = torch.arange(max_len, device=q.device).expand(num_reqs, max_len)
    slots = slots_of(page_table, torch.minimum(k_pos, (seq_lens[:, None] - 1).clamp(min=0)), page_size)
    scores = _scores(qg, cache, fmt, slots)  # [B, Hkv, G, max_q, L]
    raw = None
    if window is not None:
        assert new_kv is not None and cache.ring_k is not None and cache.ring_v is not None
        raw = _raw_rows(k_pos, seq_lens - n_q, cu_seqlens, new_kv, cache, window)
        b_raw, p_raw, k_raw, _ = raw
        # those positions' scores from their bf16 keys, met by the plain q of their request
        scores.permute(0, 4, 1, 2, 3)[b_raw, p_raw] = torch.einsum("nqhgd,nhd->nhgq", qg[b_raw], k_raw)
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]  # [B, max_q, L]
    scores = (scores * sm_scale).masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # padded query rows see nothing
    if raw is None:
        out = _weighted_values(probs, cache, fmt, slots)
    else:
        b_raw, p_raw, _, v_raw = raw
        p_of_raw = probs.permute(0, 4, 1, 2, 3)[b_raw, p_raw]  # [N, Hkv, G, max_q]
        probs.permute(0, 4, 1, 2, 3)[b_raw, p_raw] = 0.0
        out = _weighted_values(probs, cache, fmt, slots)
        out.index_add_(0, b_raw, torch.einsum("nhgq,nhd->nqhgd", p_of_raw, v_raw))
    return out.reshape(num_reqs, max_q, hq, d)[q_valid].to(q.dtype)


def _codes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high nibbles of packed rows (dims 0 .. D/2 - 1 and D/2 .. D - 1) as fp32."""
    return (packed & 0xF).float(), (packed >> 4).float()


def _scores(qg: torch.Tensor, cache: LayerCache, fmt: KVFormat, slots: torch.Tensor) -> torch.Tensor:
    """q . decode_k(row) of queries qg [B, Q, Hkv, G, D] against the K rows at slots [B, L]: [B, Hkv, G, Q, L].
    An INT4 row is c s + lo (codes c), so R q . row = s (R q . c) + lo sum(R q), plus q . mu when centered."""
    if not fmt.quantized:
        return torch.einsum("bqhgd,blhd->bhgql", qg, cache.k[slots].float())
    assert cache.k_params is not None
    qs = rotate(qg, fmt.hadamard_order) if fmt.rotated else qg
    half = qg.shape[-1] // 2
    c_lo, c_hi = _codes(cache.k[slots])
    dots = torch.einsum("bqhgd,blhd->bhgql", qs[..., :half], c_lo) + \
        torch.einsum("bqhgd,blhd->bhgql", qs[..., half:], c_hi)
    scale, lo = cache.k_params[slots].float().permute(0, 2, 1, 3).unbind(-1)  # [B, Hkv, L] each
    out = dots * scale[:, :, None, None] + qs.sum(-1).permute(0, 2, 3, 1)[..., None] * lo[:, :, None, None]
    if fmt.k_center and cache.k_mean is not None:
        out += torch.einsum("bqhgd,hd->bhgq", qg, cache.k_mean.float())[..., None]
    return out


def _weighted_values(probs: torch.Tensor, cache: LayerCache, fmt: KVFormat, slots: torch.Tensor) -> torch.Tensor:
    """sum_l probs[..., l] decode_o(V row at slots[l]) for probs [B, Hkv, G, Q, L]: [B, Q, Hkv, G, D]. For INT4
    rows, sum p (c s + lo) = (p s) . c + sum p lo in the stored space, rotated back once (decode_o)."""
    if not fmt.quantized:
        return torch.einsum("bhgql,blhd->bqhgd", probs, cache.v[slots].float())
    assert cache.v_params is not None
    scale, lo = cache.v_params[slots].float().permute(0, 2, 1, 3).unbind(-1)  # [B, Hkv, L] each
    c_lo, c_hi = _codes(cache.v[slots])
    weighted = probs * scale[:, :, None, None]
    base = torch.einsum("bhgql,bhl->bqhg", probs, lo)[..., None]
    o = torch.cat([torch.einsum("bhgql,blhd->bqhgd", weighted, c_lo),
                   torch.einsum("bhgql,blhd->bqhgd", weighted, c_hi)], -1) + base
    return decode_o(o, fmt)


def _raw_rows(k_pos: torch.Tensor, prefix_lens: torch.Tensor, cu_seqlens: torch.Tensor,
              new_kv: tuple[torch.Tensor, torch.Tensor], cache: LayerCache, window: WindowLayout
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (request, position) pairs read at bf16 and their K, V rows [N, Hkv, D] (fp32): the sinks and the
    window from the ring below the prefix, the step's own K, V at and above it (at most S + W + new per
    request)."""
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
    # new tokens at the cache's precision, as the GPU path holds them (bf16 activations)
    rows = [torch.cat([ring.view(-1, *ring.shape[2:])[ring_at].float(), new[new_at].to(ring.dtype).float()])
            for ring, new in ((cache.ring_k, new_kv[0]), (cache.ring_v, new_kv[1]))]
    return torch.cat([b_ring, b_new]), torch.cat([p_ring, p_new]), rows[0], rows[1]
