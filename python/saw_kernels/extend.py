"""Extend (chunked prefill) attention: new tokens at bf16, causal among themselves, plus the request's
cached prefix read straight from the paged cache (INT4 codes dequantized in registers, never as a
copy of the sequence).

A prefix tile is dequantized to bf16 values s c + lo (one bf16x2 fma per two values, deq=4) and then
attended like a bf16 cache: with 128 query rows per program the per-element dequant is cheaper than
keeping codes and correcting every score (deq=3; SASS of the prefix loop for sm_90: 980 -> 730
instructions, the bf16 new-token loop is 620).

With the bf16 window (ring) a phase between the two attends to the ring's valid slots: raw rows, like
the new tokens, visible to every query of the request (all older than it).

The phases live in different spaces, and the kernel brings them together:
- int4-bdr keys are stored rotated: the prefix phase uses R q, the ring and new-token phases plain q;
- centered keys (k_center) shift every prefix logit by -q.mu but not the raw ones, so q.mu is
  added back to the prefix logits (this needs k_mean);
- with rotate_v the prefix values are rotated: the accumulator is rotated back (R is linear and
  its own inverse) after the prefix phase, before any raw value is added to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from saw_kernels._common import INTERPRET, LOG2E, cache_args, load_hmat, page_slots, rotate_halves, store_halves
from saw_kernels.decode import attend_block, load_kv_block
from saw_kernels.window import Ring, ring_args, ring_tile
from saw_kv.cache import LayerCache


@triton.jit
def _neg_zeros(N: tl.constexpr):
    """[N] of -0.0, the bias that folds away: s + -0.0 == s for every s, s + 0.0 is an add per score.
    Built from its bits: triton 3.6 turns a literal -0.0 into +0.0."""
    return tl.full([N], -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _new_tile(q_lo, q_hi, k_ptr, v_ptr, row0, n0, new_len, i, kh, s_kt, s_kh, s_vt, s_vh, c, qk_scale,
              m_i, l_i, acc_lo, acc_hi, D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DIAG: tl.constexpr):
    """Attend to new keys n0 .. n0 + BLOCK_N; DIAG: the tile may hold keys past a query or past new_len."""
    j = n0 + tl.arange(0, BLOCK_N)
    k_p = k_ptr + ((row0 + j).to(tl.int64) * s_kt + kh * s_kh)[:, None] + c[None, :]
    v_p = v_ptr + ((row0 + j).to(tl.int64) * s_vt + kh * s_vh)[:, None] + c[None, :]
    if DIAG:
        jm = j < new_len
        k_lo = tl.load(k_p, mask=jm[:, None], other=0.0)
        k_hi = tl.load(k_p + D2, mask=jm[:, None], other=0.0)
        v_lo = tl.load(v_p, mask=jm[:, None], other=0.0)
        v_hi = tl.load(v_p + D2, mask=jm[:, None], other=0.0)
        valid = (j[None, :] <= i[:, None]) & jm[None, :]
    else:
        k_lo, k_hi, v_lo, v_hi = tl.load(k_p), tl.load(k_p + D2), tl.load(v_p), tl.load(v_p + D2)
        valid = True
    return attend_block(q_lo, q_hi, 0.0, _neg_zeros(BLOCK_M)[:, None], qk_scale, k_lo, k_hi, 0.0, 0.0, v_lo, v_hi,
                        0.0, 0.0, valid, m_i, l_i, acc_lo, acc_hi, False, 1)


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr, pre_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, pt_ptr, h_ptr, mean_ptr, out_ptr,
    rk_ptr, rv_ptr, rows_ptr, rlen_ptr, end_ptr, sinks_ptr,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, s_ptb, s_ot, s_oh, s_rr, s_rs, s_rh,
    qk_scale, inv_sqrt_b,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
    ROT_Q: tl.constexpr, ROT_V: tl.constexpr, FULL: tl.constexpr, CENTER: tl.constexpr, DEQ: tl.constexpr,
    PREFIX: tl.constexpr, S: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A program serves BQ = BLOCK_M / GP queries times the GP (>= G, padded) heads of one KV head's
    # group, so each cached tile is loaded and dequantized once for the whole group.
    D2: tl.constexpr = D // 2
    BQ: tl.constexpr = BLOCK_M // GP
    # last query block first: the programs with the most new-key tiles start early, short ones fill the tail
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    kh = tl.program_id(1)
    b = tl.program_id(2)
    row0 = tl.load(cu_ptr + b)
    new_len = tl.load(cu_ptr + b + 1) - row0
    active = mb * BQ < new_len  # the grid is sized for the longest request
    r = tl.arange(0, BLOCK_M)
    i = mb * BQ + r // GP  # query index within the request
    g = r % GP
    qh = kh * G + g
    im = (i < new_len) & (g < G)
    c = tl.arange(0, D2)
    q_off = (row0 + i).to(tl.int64) * s_qt + qh * s_qh
    q_lo = tl.load(q_ptr + q_off[:, None] + c[None, :], mask=im[:, None], other=0.0)
    q_hi = tl.load(q_ptr + q_off[:, None] + D2 + c[None, :], mask=im[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D2], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, D2], tl.float32)

    # phase 1: cached prefix [first, prefix) from the pages (first: the request's bf16 sinks). Without PREFIX (no
    # request of the batch has one, e.g. a prompt's first chunk) it is not compiled in: the new-token loop then
    # gets the registers.
    prefix = tl.where(active & PREFIX, tl.load(pre_ptr + b), 0)
    if PREFIX and prefix > 0:
        r_lo = q_lo.to(tl.float32)
        r_hi = q_hi.to(tl.float32)
        bias = _neg_zeros(BLOCK_M)  # no add per score unless CENTER
        if CENTER:  # q.mu: the stored keys' shift, added back
            mu = mean_ptr + kh * D
            bias = tl.sum(r_lo * tl.load(mu + c)[None, :], 1) + tl.sum(r_hi * tl.load(mu + D2 + c)[None, :], 1)
        if ROT_Q or ROT_V:
            hm = load_hmat(h_ptr, D2)
        if ROT_Q:
            r_lo, r_hi = rotate_halves(r_lo, r_hi, hm, inv_sqrt_b, FULL, 1)
        rb_lo = r_lo.to(tl.bfloat16)
        rb_hi = r_hi.to(tl.bfloat16)
        r_sum = tl.sum(r_lo, 1) + tl.sum(r_hi, 1)
        pt_row = pt_ptr + b.to(tl.int64) * s_ptb
        first = tl.load(sinks_ptr + b) if S > 0 else 0
        for n0 in range(0, prefix, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            nm = (pos < prefix) & (pos >= first)
            slot = page_slots(pt_row, pos, nm, PAGE)
            k_lo, k_hi, k_s, k_m = load_kv_block(kc_ptr, kp_ptr, slot, kh, s_kcs, s_kch, s_ps, s_ph, c, nm, QUANT, D2,
                                                 DEQ)
            v_lo, v_hi, v_s, v_m = load_kv_block(vc_ptr, vp_ptr, slot, kh, s_vcs, s_vch, s_ps, s_ph, c, nm, QUANT, D2,
                                                 DEQ)
            m_i, l_i, acc_lo, acc_hi = attend_block(
                rb_lo, rb_hi, r_sum, bias[:, None], qk_scale, k_lo, k_hi, k_s, k_m, v_lo, v_hi, v_s,
                v_m, nm[None, :], m_i, l_i, acc_lo, acc_hi, QUANT and DEQ != 4, 1)
        if ROT_V:
            acc_lo, acc_hi = rotate_halves(acc_lo, acc_hi, hm, inv_sqrt_b, FULL, 2)

    # the bf16 window (W > 0): the ring's valid slots (sinks, window), raw like the new tokens, before every query
    # of the request
    if W > 0:
        held = tl.load(rlen_ptr + b)
        if S > 0:
            held += tl.load(sinks_ptr + b)
        ring_end = tl.where(active & (held > 0), S + W, 0)
        for j0 in range(0, ring_end, BLOCK_W):
            k_lo, k_hi, v_lo, v_hi, valid = ring_tile(rk_ptr, rv_ptr, rows_ptr, rlen_ptr, end_ptr, sinks_ptr, b, kh,
                                                      j0 + tl.arange(0, BLOCK_W), c, s_rr, s_rs, s_rh, S, W, D2)
            m_i, l_i, acc_lo, acc_hi = attend_block(
                q_lo, q_hi, 0.0, _neg_zeros(BLOCK_M)[:, None], qk_scale, k_lo, k_hi, 0.0, 0.0, v_lo, v_hi, 0.0, 0.0,
                valid[None, :], m_i, l_i, acc_lo, acc_hi, False, 1)

    # phase 2: the new tokens themselves at bf16, causal (key j <= query i). A tile that ends at or
    # before the program's first query q0 (< new_len) lies below every row's diagonal and inside the
    # request, so it runs without causal and load masks (sm_90 SASS: ~580 instead of ~990 instructions
    # a tile, with the scale folded into attend_block's exp2; flash attention on Hopper is bound by this
    # non-MMA work). Only the tiles from lo on (one while BLOCK_N >= BQ) are masked.
    q0 = mb * BQ
    lo = tl.where(active, q0 // BLOCK_N * BLOCK_N, 0)
    hi = tl.where(active, tl.minimum(new_len, q0 + BQ), 0)
    for n0 in range(0, lo, BLOCK_N):
        m_i, l_i, acc_lo, acc_hi = _new_tile(q_lo, q_hi, k_ptr, v_ptr, row0, n0, new_len, i, kh, s_kt, s_kh, s_vt,
                                             s_vh, c, qk_scale, m_i, l_i, acc_lo, acc_hi, D2, BLOCK_M, BLOCK_N, False)
    for n0 in range(lo, hi, BLOCK_N):
        m_i, l_i, acc_lo, acc_hi = _new_tile(q_lo, q_hi, k_ptr, v_ptr, row0, n0, new_len, i, kh, s_kt, s_kh, s_vt,
                                             s_vh, c, qk_scale, m_i, l_i, acc_lo, acc_hi, D2, BLOCK_M, BLOCK_N, True)

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    store_halves(out_ptr, (row0 + i).to(tl.int64) * s_ot + qh * s_oh, c, (acc_lo * inv_l[:, None]).to(tl.bfloat16),
                 (acc_hi * inv_l[:, None]).to(tl.bfloat16), im, D2)


@dataclass(frozen=True)
class ExtendTuning:
    """extend_attention's launch knobs; None: chosen per platform.

    block_m: query rows (queries x padded group) per program (default 128, 16 under the interpreter; at least
    the padded group); block_n: keys per tile (default 128, 16 under the interpreter); num_warps (default 8, 4
    under the interpreter); num_stages. deq: how INT4 prefix tiles enter the tensor cores (load_kv_block): 4 as
    bf16 values s c + lo, 3 as signed codes made in PTX (0 under the interpreter), 0 as the same codes made via
    fp32, both with the affine terms on every score (module docstring).
    """

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int = 2
    deq: int = 4


DEFAULT_EXTEND = ExtendTuning()


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     prefix_lens: torch.Tensor, cache: LayerCache, page_table: torch.Tensor, sm_scale: float, *,
                     max_new_len: int | None = None, max_prefix_len: int | None = None, out: torch.Tensor | None = None,
                     ring: Ring | None = None, tuning: ExtendTuning = DEFAULT_EXTEND) -> torch.Tensor:
    """o [Tn, Hq, D] bf16: new query i of request b attends to its prefix_lens[b] tokens cached in cache (its
    pages, params, format, page size) and to new tokens 0..i of its own rows cu_seqlens[b]:cu_seqlens[b+1]
    (positions prefix_lens[b] + i); tuning: ExtendTuning.

    cache.k_mean must be the K mean the cache was written with when fmt.k_center is on (the prefix logits
    are shifted by -q.mu, the raw ones are not; None = no centering, as in write_kv). max_new_len
    avoids a host read of cu_seqlens; max_prefix_len = 0 (no request has cached tokens in the pages)
    runs a kernel without the prefix phase.
    ring (fmt.window): prefix_lens[b] is the INT4 length P - ring.lens[b] (P = ring.ends[b]), read from
    ring.sinks[b] on (with sinks); the queries also attend to the valid slots of cache's ring (sinks, window) at
    bf16, between the prefix and the new tokens.
    """
    fmt, page_size, k_cache, v_cache, k_mean = cache.fmt, cache.page_size, cache.k, cache.v, cache.k_mean
    tn, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bsz = cu_seqlens.numel() - 1
    assert group * hkv == hq and d % 32 == 0 and d == fmt.head_dim and page_size & (page_size - 1) == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if out is None:
        out = torch.empty(tn, hq, d, dtype=torch.bfloat16, device=q.device)
    if tn == 0 or bsz == 0:
        return out
    if max_new_len is None:
        max_new_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    quant = fmt.quantized
    block_m, block_n, num_warps, num_stages, deq = (tuning.block_m, tuning.block_n, tuning.num_warps,
                                                    tuning.num_stages, tuning.deq)
    kp, vp, s_ps, s_ph, hmat, full, inv = cache_args(cache)
    center = quant and fmt.k_center and k_mean is not None  # as in write_kv: no mean, nothing was subtracted
    mean = k_mean.float().contiguous() if center else k_cache
    if block_m is None:
        block_m = 16 if INTERPRET else 128
    if block_n is None:  # H100: 128 took 8 x (16k + 2k) from 18.0 to 14.6 ms (SDPA 13.5 ms)
        block_n = 16 if INTERPRET else 128
    gp = triton.next_power_of_2(group)
    block_m = max(block_m, gp)
    if num_warps is None:
        num_warps = 4 if INTERPRET else 8
    if ring is None:
        win, win_strides, w, sinks = [k_cache] * 6, (0, 0, 0), 0, 0
    else:
        win, win_strides = ring_args(cache, ring)
        w, sinks = fmt.window, fmt.sinks
    grid = (triton.cdiv(max(max_new_len, 1), block_m // gp), hkv, bsz)
    _extend_kernel[grid](
        q, k, v, cu_seqlens, prefix_lens, k_cache, v_cache, kp, vp, page_table, hmat, mean, out, *win,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), s_ps, s_ph,
        page_table.stride(0), out.stride(0), out.stride(1), *win_strides,
        sm_scale * LOG2E, inv,
        G=group, GP=gp, D=d, PAGE=page_size, QUANT=quant, ROT_Q=fmt.rotated, ROT_V=fmt.rotate_v, FULL=full,
        CENTER=center, DEQ=deq, PREFIX=max_prefix_len != 0, S=sinks, W=w,
        BLOCK_W=min(block_n, max(16, triton.next_power_of_2(sinks + w))), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
