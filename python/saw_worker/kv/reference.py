"""Torch reference of the paged-cache operations: the CPU path of the engine and the definition the
Triton kernels are checked against.

Attention here always reads keys and values back from the cache, new tokens included, so a
request's numbers do not depend on how its prompt was chunked or whether it was recomputed after
preemption. (The Triton extend kernel attends to new tokens at bf16 instead, as issue 4 asks.)
"""

from __future__ import annotations

import torch

from saw_worker.kv.formats import (
    KVFormat,
    decode_o,
    dequantize_int4,
    encode_k,
    encode_q,
    encode_v,
    quantize_int4,
)
from saw_worker.kv.pool import LayerCache


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


def read_rows(data: torch.Tensor, params: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    """Stored rows at slots (any shape) as fp32, in the stored (centered / rotated) space."""
    if params is None:
        return data[slots].float()
    return dequantize_int4(data[slots], params[slots])


def slots_of(page_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Slot of each position: page_table [B, P], positions [B, N] -> [B, N] int64."""
    pages = torch.gather(page_table.long(), 1, positions // page_size)
    return pages * page_size + positions % page_size


def paged_attention_ref(q: torch.Tensor, cu_seqlens: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
                        page_size: int, cache: LayerCache, fmt: KVFormat, sm_scale: float) -> torch.Tensor:
    """Causal attention of each request's newest queries over its cached tokens.

    q [T, Hq, D]: request b owns rows cu_seqlens[b]:cu_seqlens[b+1], its last n_b positions, so
    query i sits at position seq_lens[b] - n_b + i and sees positions <= its own. Decode is n_b = 1.
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
    qp = encode_q(q, fmt)[q_rows]  # [B, max_q, Hq, D]
    q_pos = seq_lens[:, None] - n_q[:, None] + j[None, :]

    k_pos = torch.arange(max_len, device=q.device).expand(num_reqs, max_len)
    slots = slots_of(page_table, torch.minimum(k_pos, (seq_lens[:, None] - 1).clamp(min=0)), page_size)
    keys = read_rows(cache.k, cache.k_params, slots)  # [B, L, Hkv, D]
    values = read_rows(cache.v, cache.v_params, slots)

    group = hq // hkv
    qg = qp.view(num_reqs, max_q, hkv, group, d)
    scores = torch.einsum("bqhgd,blhd->bhgql", qg, keys) * sm_scale
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]  # [B, max_q, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # padded query rows see nothing
    out = torch.einsum("bhgql,blhd->bqhgd", probs, values).reshape(num_reqs, max_q, hq, d)
    return decode_o(out[q_valid], fmt).to(q.dtype)
