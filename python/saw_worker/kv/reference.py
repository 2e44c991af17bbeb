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


def kept_rows(slots: torch.Tensor) -> torch.Tensor | None:
    """The new tokens that are stored (slot >= 0; negative slots are padding); None when all of them are."""
    keep = slots >= 0
    return None if bool(keep.all()) else keep


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache: LayerCache, fmt: KVFormat,
                 keep: torch.Tensor | None | bool = True) -> None:
    """Store new K, V [T, Hkv, D] at slots [T]; negative slots are padding and skipped. keep: kept_rows(slots)
    when the caller already has it (AttentionPlan.keep); True: found here."""
    if keep is True:
        keep = kept_rows(slots)
    if keep is not None:
        k, v, slots = k[keep], v[keep], slots[keep]
    if not fmt.quantized:
        cache.k[slots] = k.to(cache.k.dtype)
        cache.v[slots] = v.to(cache.v.dtype)
        return
    assert cache.k_params is not None and cache.v_params is not None
    # K and V rows quantized together: quantize_int4 is row-wise, and one call is half the small ops
    packed, params = quantize_int4(torch.stack([encode_k(k, fmt, cache.k_mean), encode_v(v, fmt)]))
    cache.k[slots], cache.v[slots] = packed.unbind()
    cache.k_params[slots], cache.v_params[slots] = params.unbind()


def write_window_ref(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, ring_k: torch.Tensor,
                     ring_v: torch.Tensor) -> None:
    """Keep new K, V [T, Hkv, D] raw in the rings at flat slots [T] (WindowLayout.slots)."""
    ring_k.view(-1, *ring_k.shape[2:])[slots] = k.to(ring_k.dtype)
    ring_v.view(-1, *ring_v.shape[2:])[slots] = v.to(ring_v.dtype)


def slots_of(page_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slot of each position: page_table [B, P], positions [B, N] -> [B, N] int64."""
    pages = torch.gather(page_table.long(), 1, positions // page_size)
    return pages * page_size + positions % page_size


@dataclass
class RawRows:
    """The positions a window layer reads at bf16, R per request (the most any request has; a shorter list repeats
    its first entry, with valid 0): pos [B, R] in the request, and where its K, V row is: row [B, R] in the rows the
    layer gathers, the sinks and window from the flat ring (ring_at [N]), then the step's own tokens from its new
    K, V (new_at)."""

    pos: torch.Tensor
    row: torch.Tensor
    valid: torch.Tensor  # fp32 [B, 1, R, 1]: 1 for a real entry, 0 for a repeat
    ring_at: torch.Tensor
    new_at: torch.Tensor


@dataclass
class AttentionPlan:
    """The part of paged_attention_ref that is the same in every layer of a step (indices, masks): built once
    per step, so that a layer runs only its arithmetic."""

    max_q: int
    q_rows: torch.Tensor | None  # [B, max_q]: the q row of each padded query; None when q is [B * max_q] as is
    q_valid: torch.Tensor | None  # [B, max_q] bool: real queries; None when all are
    slots: torch.Tensor  # int64 [B, L]: the cache slot each (request, position) reads (clamped to its length)
    mask: torch.Tensor  # fp32 [B, 1, 1, max_q, L]: 0 where the query sees the position, -inf elsewhere
    raw: RawRows | None  # with a window
    keep: torch.Tensor | None  # [T] bool: new tokens to store (slot >= 0); None when all are


def plan_attention(cu_seqlens: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor, page_size: int,
                   new_slots: torch.Tensor | None = None, window: WindowLayout | None = None, ring_slots: int = 0,
                   sinks: int = 0) -> AttentionPlan:
    """The plan of paged_attention_ref for queries laid out by cu_seqlens [B+1] whose requests hold seq_lens [B]
    tokens after the step; new_slots [T]: where the step stores its tokens (None: the plan does not write). With a
    window, the ring's rows per request (ring_slots) and its sinks."""
    num_reqs = seq_lens.numel()
    n_q = cu_seqlens[1:] - cu_seqlens[:-1]
    max_q, max_len = int(n_q.max()), int(seq_lens.max())
    dev = seq_lens.device
    j = torch.arange(max_q, device=dev)
    q_valid = j[None, :] < n_q[:, None]
    every_query = bool(q_valid.all())
    q_rows = None if every_query else torch.where(q_valid, cu_seqlens[:-1, None] + j[None, :], 0)
    q_pos = seq_lens[:, None] - n_q[:, None] + j[None, :]
    k_pos = torch.arange(max_len, device=dev).expand(num_reqs, max_len)
    slots = slots_of(page_table, torch.minimum(k_pos, (seq_lens[:, None] - 1).clamp(min=0)), page_size)
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]  # [B, max_q, L]
    mask = torch.zeros(visible.shape, device=dev).masked_fill_(~visible, float("-inf"))[:, None, None]
    raw = None
    if window is not None:
        raw = _raw_rows(k_pos, seq_lens - n_q, cu_seqlens, window, ring_slots, sinks)
    return AttentionPlan(max_q, q_rows, None if every_query else q_valid, slots, mask, raw,
                         None if new_slots is None else kept_rows(new_slots))


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
    plan = plan_attention(cu_seqlens, seq_lens, page_table, page_size, None, window, fmt.ring_slots, fmt.sinks)
    return attend_ref(q, plan, cache, fmt, sm_scale, new_kv)


def attend_ref(q: torch.Tensor, plan: AttentionPlan, cache: LayerCache, fmt: KVFormat, sm_scale: float,
               new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """paged_attention_ref's arithmetic for one layer, given the step's plan: q [T, Hq, D] -> o [T, Hq, D].
    Products are one matmul per (request, KV head) over its G x max_q query rows: [G Q, D] @ [D, L]."""
    num_reqs, max_q = plan.slots.shape[0], plan.max_q
    hq, d = q.shape[1], q.shape[2]
    hkv = cache.k.shape[1]
    g = hq // hkv
    qf = q.float() * sm_scale  # the scale folded into q: every score below is linear in q
    qg = (qf if plan.q_rows is None else qf[plan.q_rows]).view(num_reqs, max_q, hkv, g, d)
    qh = qg.permute(0, 2, 3, 1, 4).reshape(num_reqs, hkv, g * max_q, d)  # [B, Hkv, G Q, D]
    scores = _scores(qh, cache, fmt, plan.slots)  # [B, Hkv, G Q, L]
    raw = plan.raw
    if raw is not None:
        assert new_kv is not None and cache.ring_k is not None and cache.ring_v is not None
        # new tokens at the cache's precision, as the GPU path holds them (bf16 activations)
        k_raw, v_raw = (torch.cat([ring.view(-1, *ring.shape[2:]).index_select(0, raw.ring_at),
                                   new.index_select(0, raw.new_at).to(ring.dtype)])
                        .index_select(0, raw.row.flatten()).unflatten(0, raw.row.shape).transpose(1, 2).float()
                        for ring, new in ((cache.ring_k, new_kv[0]), (cache.ring_v, new_kv[1])))  # [B, Hkv, R, D]
        at = raw.pos[:, None, None, :].expand(num_reqs, hkv, g * max_q, raw.pos.shape[1])
        # those positions' scores from their bf16 keys, met by the plain q of their request
        scores.scatter_(-1, at, qh @ k_raw.transpose(-1, -2))
    probs = torch.softmax(scores.view(num_reqs, hkv, g, max_q, -1) + plan.mask, -1).view(scores.shape)
    if plan.q_valid is not None:
        probs = probs.nan_to_num(0.0)  # padded query rows see nothing
    if raw is None:
        out = _weighted_values(probs, cache, fmt, plan.slots)
    else:
        p_raw = probs.gather(-1, at)
        out = _weighted_values(probs.scatter_(-1, at, 0.0), cache, fmt, plan.slots) + p_raw @ (v_raw * raw.valid)
    out = out.view(num_reqs, hkv, g, max_q, d).permute(0, 3, 1, 2, 4).reshape(num_reqs, max_q, hq, d)
    return (out.flatten(0, 1) if plan.q_valid is None else out[plan.q_valid]).to(q.dtype)


def _select(table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """table[slots] for slots [B, L] -> [B, Hkv, L, ...] (a view), in the table's dtype. index_select: on the CPU
    an order of magnitude faster than indexing."""
    return table.index_select(0, slots.flatten()).unflatten(0, slots.shape).transpose(1, 2)


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed rows [..., D/2] (low nibbles are dims 0 .. D/2 - 1, high ones the rest) -> codes [..., D] fp32."""
    return torch.cat([packed & 0xF, packed >> 4], -1).float()


def _scores(q: torch.Tensor, cache: LayerCache, fmt: KVFormat, slots: torch.Tensor) -> torch.Tensor:
    """q . decode_k(row) of queries q [B, Hkv, N, D] against the K rows at slots [B, L]: [B, Hkv, N, L].
    An INT4 row is c s + lo (codes c), so R q . row = s (R q . c) + lo sum(R q), plus q . mu when centered."""
    if not fmt.quantized:
        return q @ _select(cache.k, slots).float().transpose(-1, -2)
    assert cache.k_params is not None
    qs = rotate(q, fmt.hadamard_order) if fmt.rotated else q
    dots = qs @ _codes(_select(cache.k, slots)).transpose(-1, -2)
    scale, lo = _select(cache.k_params, slots).float().unbind(-1)  # [B, Hkv, L] each
    out = torch.addcmul(dots * scale[:, :, None], qs.sum(-1, keepdim=True), lo[:, :, None])
    if fmt.k_center and cache.k_mean is not None:
        out += q @ cache.k_mean.float()[None, :, :, None]  # [B, Hkv, N, 1]
    return out


def _weighted_values(probs: torch.Tensor, cache: LayerCache, fmt: KVFormat, slots: torch.Tensor) -> torch.Tensor:
    """sum_l probs[..., l] decode_o(V row at slots[l]) for probs [B, Hkv, N, L]: [B, Hkv, N, D]. For INT4 rows,
    sum p (c s + lo) = (p s) . c + sum p lo in the stored space, rotated back once (decode_o)."""
    if not fmt.quantized:
        return probs @ _select(cache.v, slots).float()
    assert cache.v_params is not None
    scale, lo = _select(cache.v_params, slots).float().unbind(-1)  # [B, Hkv, L] each
    return decode_o((probs * scale[:, :, None]) @ _codes(_select(cache.v, slots)) + probs @ lo[..., None], fmt)


def _raw_rows(k_pos: torch.Tensor, prefix_lens: torch.Tensor, cu_seqlens: torch.Tensor, window: WindowLayout,
              n_slots: int, sinks: int) -> RawRows:
    """The positions read at bf16: the sinks and the window from the ring below the prefix, the step's own K, V at
    and above it (at most S + W + new per request; every request has its new tokens)."""
    num_reqs = k_pos.shape[0]
    w = n_slots - sinks
    prefix = prefix_lens.long()[:, None]
    starts = cu_seqlens[:-1].long()[:, None]
    n_new = cu_seqlens[1:].long()[:, None] - starts
    in_window = (k_pos >= window.quant_lens.long()[:, None]) & (k_pos < prefix)
    b_ring, p_ring = (in_window | (k_pos < window.sinks.long()[:, None])).nonzero(as_tuple=True)
    b_new, p_new = ((k_pos >= prefix) & (k_pos < prefix + n_new)).nonzero(as_tuple=True)
    ring_at = window.rows.long()[b_ring] * n_slots + torch.where(in_window[b_ring, p_ring], sinks + p_ring % w, p_ring)
    new_at = starts[b_new, 0] + p_new - prefix[b_new, 0]
    # per request: its entries in order, padded by repeating its first one
    b, p = torch.cat([b_ring, b_new]), torch.cat([p_ring, p_new])
    order = torch.argsort(b, stable=True)
    counts = torch.bincount(b, minlength=num_reqs)
    assert bool((counts > 0).all()), "every request of a step has new tokens"
    first = torch.cumsum(counts, 0) - counts
    b_sorted = b[order]
    rank = torch.arange(b.numel(), device=b.device) - first[b_sorted]
    row = order[first][:, None].repeat(1, int(counts.max()))
    row[b_sorted, rank] = order
    valid = torch.zeros(row.shape, device=b.device)
    valid[b_sorted, rank] = 1.0
    return RawRows(p[row], row, valid[:, None, :, None], ring_at, new_at)
