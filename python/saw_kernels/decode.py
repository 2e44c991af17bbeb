"""Paged decode attention (flash-decoding): the bf16 kernel, the split reduce, and the entry point.

One program per (request, KV head, split) serves the KV head's whole query group, so each cached
byte is read once per step. INT4 formats run `decode_int4_warp` on CUDA (persistent one-warp
programs walking equal runs of steps across requests, operands in registers; the last piece of
each request combines them) or `decode_int4.decode_int4_kernel` (plain Triton, also under the
interpreter; split partials, as the bf16 kernel). The cache-tile helpers here
(`load_kv_block`, `attend_block`) are shared with the extend kernel: there INT4 codes enter the
tensor cores as exact small integers, with
  q . k_hat = s (q . c) + lo sum(q)   and   sum_n p_n v_hat_n = (p s_v) @ c_v + sum_n p_n lo_n.
For int4-bdr, R q . R k = q . k: the engine passes q already rotated (write_kv rotates it in the same
launch, once per step); given plain q, each program rotates it. With rotate_v the output is rotated
back once per head (in the reduce, or at the end when there is one split). With the bf16 window a first
launch (`_window_piece_kernel`) attends the ring's valid slots (sinks and window) and the new token and
leaves one more partial, which the warp kernel's combine (or the reduce) merges with the INT4 ones; those
skip the sinks (window.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from saw_kernels._common import (
    _INTERP,
    INTERPRET,
    LOG2E,
    cache_args,
    load_hmat,
    load_query_group,
    mma,
    num_sms,
    page_slots,
    rotate_halves,
    split_bounds,
    store_halves,
    store_split_result,
)
from saw_kernels.decode_int4 import decode_int4_kernel, query_rows
from saw_kernels.decode_int4_warp import (
    MAX_PIECES,
    launch_warp_decode,
    warp_kernel_fits,
    warp_programs,
)
from saw_kernels.decode_int4_warp import STAGES as WARP_STAGES
from saw_kernels.window import Ring, flat_slots, ring_args, ring_tile
from saw_kv.cache import LayerCache


@triton.jit
def _dequant_bf16_asm(packed, scale, shift):
    """uint8 codes -> bf16 s (c - 8) + shift of (low nibbles, high nibbles), scale and shift given per
    element as bf16. 128 + c by bits, c - 8 by one exact bf16x2 fma (x * 1 - 136), then one bf16x2 fma
    per two values (rounded once)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t0, t1, t2, t3, x, one, off;
        mov.b32 one, 0x3F803F80;
        mov.b32 off, 0xC308C308;
        shr.b32 x, $4, 4;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        prmt.b32 t2, x, 0, 0x4140;
        prmt.b32 t3, x, 0, 0x4342;
        lop3.b32 t0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 t2, t2, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 t3, t3, 0x000F000F, 0x43004300, 0xEA;
        fma.rn.bf16x2 t0, t0, one, off;
        fma.rn.bf16x2 t1, t1, one, off;
        fma.rn.bf16x2 t2, t2, one, off;
        fma.rn.bf16x2 t3, t3, one, off;
        fma.rn.bf16x2 $0, t0, $5, $7;
        fma.rn.bf16x2 $1, t1, $6, $8;
        fma.rn.bf16x2 $2, t2, $5, $7;
        fma.rn.bf16x2 $3, t3, $6, $8;
        }""",
        constraints="=r,=r,=r,=r,r,r,r,r,r", args=[packed, scale, shift], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=4)


@triton.jit
def load_kv_block(c_ptr, p_ptr, slot, h, s_cs, s_ch, s_ps, s_ph, c, nm, QUANT: tl.constexpr, D2: tl.constexpr,
                  DEQ: tl.constexpr):
    """Rows at slots [N] of one head: (lo half, hi half) as bf16 [N, D/2] and per-row (scale, shift) fp32 [N].

    INT4 rows come back as signed codes x = c - 8 with the row value s * x + (lo + 8 s) (small
    terms keep the extend kernel's bf16 P accurate): DEQ 0 via fp32, DEQ 3 in inline PTX (GPU
    only; 0 under the interpreter). DEQ 4 returns the values themselves as bf16 (the row terms are
    then unused: attend with QUANT off).
    p_ptr is the (scale, lo) fp16 pair viewed as one int32 per row.
    """
    off = slot * s_cs + h * s_ch
    if QUANT:
        packed = tl.load(c_ptr + off[:, None] + c[None, :], mask=nm[:, None], other=0)
        w = tl.load(p_ptr + slot * s_ps + h * s_ph, mask=nm, other=0)
        sc = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        lo = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) + 8.0 * sc
        if DEQ == 4 and not _INTERP:
            x_lo, x_hi = _dequant_bf16_asm(packed, tl.broadcast_to(sc.to(tl.bfloat16)[:, None], packed.shape),
                                           tl.broadcast_to(lo.to(tl.bfloat16)[:, None], packed.shape))
        elif DEQ == 3 and not _INTERP:  # codes only: scale 1, shift 0
            x_lo, x_hi = _dequant_bf16_asm(packed, tl.full(packed.shape, 1.0, tl.bfloat16),
                                           tl.full(packed.shape, 0.0, tl.bfloat16))
        elif DEQ == 4:  # via fp32: the interpreter botches int -> bf16
            x_lo = (((packed & 15).to(tl.float32) - 8.0) * sc[:, None] + lo[:, None]).to(tl.bfloat16)
            x_hi = (((packed >> 4).to(tl.float32) - 8.0) * sc[:, None] + lo[:, None]).to(tl.bfloat16)
        else:
            x_lo = ((packed & 15).to(tl.float32) - 8.0).to(tl.bfloat16)
            x_hi = ((packed >> 4).to(tl.float32) - 8.0).to(tl.bfloat16)
    else:
        x_lo = tl.load(c_ptr + off[:, None] + c[None, :], mask=nm[:, None], other=0.0)
        x_hi = tl.load(c_ptr + off[:, None] + D2 + c[None, :], mask=nm[:, None], other=0.0)
        sc = nm.to(tl.float32)
        lo = sc * 0.0
    return x_lo, x_hi, sc, lo


@triton.jit
def attend_block(q_lo, q_hi, q_sum, bias, qk_scale, k_lo, k_hi, k_s, k_m, v_lo, v_hi, v_s, v_m, valid,
                 m_i, l_i, acc_lo, acc_hi, QUANT: tl.constexpr, PSPLIT: tl.constexpr):
    """One online-softmax step (log2 domain) over a block of cached rows.

    q is given as bf16 halves; bias (per query) is added to raw scores; scores are then scaled by
    qk_scale = sm_scale * log2(e) > 0. The max is taken over raw scores and scaled once per row, so the
    scale and the max's subtraction are one FMA per score.
    """
    s = mma(q_lo, tl.trans(k_lo)) + mma(q_hi, tl.trans(k_hi))
    if QUANT:
        s = s * k_s[None, :] + q_sum[:, None] * k_m[None, :]
    s = tl.where(valid, s + bias, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc_lo = acc_lo * alpha[:, None]
    acc_hi = acc_hi * alpha[:, None]
    pw = p
    if QUANT:
        pw = p * v_s[None, :]
        shift = tl.sum(p * v_m[None, :], 1)[:, None]
        acc_lo += shift
        acc_hi += shift
    pb = pw.to(tl.bfloat16)
    acc_lo = mma(pb, v_lo, acc_lo)
    acc_hi = mma(pb, v_hi, acc_hi)
    if PSPLIT == 2:  # second bf16 piece of the weights: ~16-bit P where the tensor cores are idle anyway
        pr = (pw - pb.to(tl.float32)).to(tl.bfloat16)
        acc_lo = mma(pr, v_lo, acc_lo)
        acc_hi = mma(pr, v_hi, acc_hi)
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _decode_bf16_kernel(
    q_ptr, kc_ptr, vc_ptr, pt_ptr, len_ptr, out_ptr, po_ptr, pl_ptr,
    s_qb, s_qh, s_kcs, s_kch, s_vcs, s_vch, s_ptb, s_ob, s_oh, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    D2: tl.constexpr = D // 2
    b = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    qh, gm, c, q_lo, q_hi = load_query_group(q_ptr, b, kh, s_qb, s_qh, G, GP, D2)

    start, end = split_bounds(len_ptr, b, sp, SPLITS, BLOCK_N)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc_lo = tl.zeros([GP, D2], tl.float32)
    acc_hi = tl.zeros([GP, D2], tl.float32)
    pt_row = pt_ptr + b.to(tl.int64) * s_ptb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nm = pos < end
        slot = page_slots(pt_row, pos, nm, PAGE)
        k_lo, k_hi, k_s, k_m = load_kv_block(kc_ptr, kc_ptr, slot, kh, s_kcs, s_kch, 0, 0, c, nm, False, D2, 0)
        v_lo, v_hi, v_s, v_m = load_kv_block(vc_ptr, vc_ptr, slot, kh, s_vcs, s_vch, 0, 0, c, nm, False, D2, 0)
        m_i, l_i, acc_lo, acc_hi = attend_block(
            q_lo, q_hi, 0.0, 0.0, qk_scale, k_lo, k_hi, k_s, k_m, v_lo, v_hi, v_s, v_m,
            nm[None, :], m_i, l_i, acc_lo, acc_hi, False, 2)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    store_split_result(acc_lo / l_safe[:, None], acc_hi / l_safe[:, None], m_i, l_i, b, sp, qh, gm, c, out_ptr,
                       po_ptr, pl_ptr, s_ob, s_oh, HQ, D, SPLITS, SPLITS == 1)


@triton.jit
def _attend_window(qp_ptr, kn_ptr, vn_ptr, rk_ptr, rv_ptr, rows_ptr, rlen_ptr, end_ptr, sinks_ptr, mean_ptr, b, kh,
                   s_qpb, s_qph, s_knb, s_knh, s_vnb, s_vnh, s_rr, s_rs, s_rh, qk_scale,
                   G: tl.constexpr, GP: tl.constexpr, D2: tl.constexpr, S: tl.constexpr, W: tl.constexpr,
                   BLOCK_W: tl.constexpr, SHIFT: tl.constexpr):
    """Online softmax (attend_block's m, l, acc) of request b's plain queries of KV head kh over raw bf16 rows
    j = 0 .. S + W: the valid ring slots (sinks, then window), then (j = S + W) the new token.

    The INT4 partials' scores are q . k - q . mu (keys stored centered, SHIFT), so the same shift is added to
    these raw scores before they meet in one softmax.
    """
    _, gm, c, q_lo, q_hi = load_query_group(qp_ptr, b, kh, s_qpb, s_qph, G, GP, D2)
    bias = 0.0
    if SHIFT:
        mu_lo = tl.load(mean_ptr + kh * (2 * D2) + c)
        mu_hi = tl.load(mean_ptr + kh * (2 * D2) + D2 + c)
        bias = -(tl.sum(q_lo.to(tl.float32) * mu_lo[None, :], 1) + tl.sum(q_hi.to(tl.float32) * mu_hi[None, :], 1))
        bias = bias[:, None]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc_lo = tl.zeros([GP, D2], tl.float32)
    acc_hi = tl.zeros([GP, D2], tl.float32)
    for j0 in tl.static_range(0, S + W + 1, BLOCK_W):
        j = j0 + tl.arange(0, BLOCK_W)
        k_lo, k_hi, v_lo, v_hi, valid = ring_tile(rk_ptr, rv_ptr, rows_ptr, rlen_ptr, end_ptr, sinks_ptr, b, kh, j, c,
                                                  s_rr, s_rs, s_rh, S, W, D2)
        if j0 + BLOCK_W > S + W:  # the tile holding row S + W: the new token (k_new, v_new may be strided views)
            new = j == S + W
            nm = new[:, None]
            row = (j * 0).to(tl.int64)[:, None] + c[None, :]  # the token's row, broadcast over the tile
            k_p = kn_ptr + b.to(tl.int64) * s_knb + kh * s_knh + row
            v_p = vn_ptr + b.to(tl.int64) * s_vnb + kh * s_vnh + row
            k_lo = tl.where(nm, tl.load(k_p, mask=nm, other=0.0), k_lo)
            k_hi = tl.where(nm, tl.load(k_p + D2, mask=nm, other=0.0), k_hi)
            v_lo = tl.where(nm, tl.load(v_p, mask=nm, other=0.0), v_lo)
            v_hi = tl.where(nm, tl.load(v_p + D2, mask=nm, other=0.0), v_hi)
            valid = valid | new
        m_i, l_i, acc_lo, acc_hi = attend_block(q_lo, q_hi, 0.0, bias, qk_scale, k_lo, k_hi, 0.0, 0.0, v_lo, v_hi, 0.0,
                                                0.0, valid[None, :], m_i, l_i, acc_lo, acc_hi, False, 2)
    return m_i, l_i, acc_lo, acc_hi


@triton.jit
def _window_piece_kernel(wo_ptr, wl_ptr, qp_ptr, kn_ptr, vn_ptr, rk_ptr, rv_ptr, rows_ptr, rlen_ptr, end_ptr, sinks_ptr,
                         mean_ptr, keep_ptr, s_qpb, s_qph, s_knb, s_knh, s_vnb, s_vnh, s_rr, s_rs, s_rh, qk_scale,
                         HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, S: tl.constexpr,
                         W: tl.constexpr, BLOCK_W: tl.constexpr, SHIFT: tl.constexpr, KEEP: tl.constexpr):
    """The bf16 rows' partial of (request b, KV head kh) (_attend_window): o [B, Hq, D] fp32, normalized, and
    lse [B, Hq] (log2), one more piece for the warp kernel's combine or _reduce_kernel. It reads nothing the
    INT4 kernels write, so it runs before them. With KEEP the new token then goes into the ring at flat slot
    keep_ptr[b] (only this program reads row b's head kh, so the write after its reads needs no other
    ordering)."""
    D2: tl.constexpr = D // 2
    b = tl.program_id(0)
    kh = tl.program_id(1)
    m_w, l_w, aw_lo, aw_hi = _attend_window(
        qp_ptr, kn_ptr, vn_ptr, rk_ptr, rv_ptr, rows_ptr, rlen_ptr, end_ptr, sinks_ptr, mean_ptr, b, kh,
        s_qpb, s_qph, s_knb, s_knh, s_vnb, s_vnh, s_rr, s_rs, s_rh, qk_scale, G, GP, D2, S, W, BLOCK_W, SHIFT)
    g = tl.arange(0, GP)
    gm = g < G
    row = b.to(tl.int64) * HQ + kh * G + g
    inv = 1.0 / l_w  # l_w >= 1: the new token is always there
    store_halves(wo_ptr, row * D, tl.arange(0, D2), aw_lo * inv[:, None], aw_hi * inv[:, None], gm, D2)
    tl.store(wl_ptr + row, m_w + tl.log2(l_w), mask=gm)
    if KEEP:
        tl.debug_barrier()  # every thread's ring reads are done before the slot may be overwritten
        d = tl.arange(0, D)
        dst = tl.load(keep_ptr + b) * s_rs + kh * s_rh + d
        tl.store(rk_ptr + dst, tl.load(kn_ptr + b.to(tl.int64) * s_knb + kh * s_knh + d))
        tl.store(rv_ptr + dst, tl.load(vn_ptr + b.to(tl.int64) * s_vnb + kh * s_vnh + d))


@triton.jit
def _reduce_kernel(po_ptr, pl_ptr, meta_ptr, h_ptr, out_ptr, s_ob, s_oh, inv_sqrt_b, wo_ptr, wl_ptr,
                   HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                   SP2: tl.constexpr, PIECES: tl.constexpr, ROT_V: tl.constexpr, FULL: tl.constexpr,
                   WINDOW: tl.constexpr):
    """out of (request, KV head) from its partials: SPLITS rows per query at (b Hq + query) SPLITS, or
    with PIECES the warp kernel's pieces, rows (first + i) G + group member, (first, count) in meta.
    With WINDOW the bf16 rows' partial (_window_piece_kernel, rows b Hq + query) is one more, added after
    the INT4 ones are rotated back (ROT_V)."""
    D2: tl.constexpr = D // 2
    b = tl.program_id(0)
    kh = tl.program_id(1)
    g = tl.arange(0, GP)
    gm = g < G
    qh = kh * G + g
    c = tl.arange(0, D2)
    s = tl.arange(0, SP2)
    if PIECES:
        pair = b * (HQ // G) + kh
        base = tl.load(meta_ptr + 2 * pair).to(tl.int64) * G + g
        count = tl.load(meta_ptr + 2 * pair + 1)
        stride = G
    else:
        base = (b.to(tl.int64) * HQ + qh) * SPLITS
        count = SPLITS
        stride = 1
    lse = tl.load(pl_ptr + base[:, None] + s[None, :] * stride, mask=gm[:, None] & (s[None, :] < count),
                  other=float("-inf"))
    m = tl.max(lse, 1)
    if WINDOW:
        w_row = b.to(tl.int64) * HQ + qh
        lse_w = tl.load(wl_ptr + w_row, mask=gm, other=float("-inf"))
        m = tl.maximum(m, lse_w)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_all = tl.exp2(lse - m[:, None])
    denom = tl.sum(w_all, 1)
    o_lo = tl.zeros([GP, D2], tl.float32)
    o_hi = tl.zeros([GP, D2], tl.float32)
    for i0 in range(0, count, 4):  # 4 partials' loads in flight at once (the count is not always constant)
        for u in tl.static_range(4):
            row = base + (i0 + u) * stride
            # (g * 0 + ...: a tensor, where the interpreter sees two ints and a constexpr count)
            li = tl.load(pl_ptr + row, mask=gm & (g * 0 + i0 + u < count), other=float("-inf"))
            w = tl.exp2(li - m)
            use = (li > float("-inf"))[:, None]  # empty splits wrote no partial: never read it
            o_lo += w[:, None] * tl.load(po_ptr + row[:, None] * D + c[None, :], mask=use, other=0.0)
            o_hi += w[:, None] * tl.load(po_ptr + row[:, None] * D + D2 + c[None, :], mask=use, other=0.0)
    if ROT_V:  # R is linear: the weighted sum is rotated back before any raw value joins it
        o_lo, o_hi = rotate_halves(o_lo, o_hi, load_hmat(h_ptr, D2), inv_sqrt_b, FULL, 2)
    if WINDOW:
        ww = tl.exp2(lse_w - m)
        denom += ww
        o_lo += ww[:, None] * tl.load(wo_ptr + w_row[:, None] * D + c[None, :], mask=gm[:, None], other=0.0)
        o_hi += ww[:, None] * tl.load(wo_ptr + w_row[:, None] * D + D2 + c[None, :], mask=gm[:, None], other=0.0)
    inv = 1.0 / tl.where(denom > 0, denom, 1.0)
    store_halves(out_ptr, b.to(tl.int64) * s_ob + qh * s_oh, c, (o_lo * inv[:, None]).to(tl.bfloat16),
                 (o_hi * inv[:, None]).to(tl.bfloat16), gm, D2)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device,
                      block_n: int = 64, quantized: bool = False) -> int:
    """Splits per (request, KV head) of the bf16 and tile kernels, from shapes only (graph-safe).

    bf16 (bandwidth-bound) wants ~2 waves of SMs. The INT4 kernel is latency-bound with 3 programs
    per SM: it wants ~8 programs per SM (H100, 2026-11-23: at 64 x 4k, 1 / 2 / 4 splits took
    207 / 181 / 186 us; at 128 x 2k, 1 split beat 2, 180 vs 192 us).
    """
    programs = batch * num_kv_heads
    sms = num_sms(device)
    want = max(1, 8 * sms // programs) if quantized else triton.cdiv(2 * sms, programs)
    most = max(1, max_context // (4 * block_n))  # keep >= 4 blocks of work per split
    return max(1, min(want, most, 64))


@dataclass(frozen=True)
class DecodeTuning:
    """decode_attention's launch knobs; None: chosen from the shapes and the format.

    num_splits: splits per (request, KV head) of the bf16 and tile kernels (default from the shapes and
    max_context: choose_num_splits); for the warp kernel, programs per (request, KV head) (default: one per warp
    slot of the GPU, whatever the batch).
    block_n (default 128 for INT4, 64 for bf16, 16 under the interpreter; measured on H100, docs/kernels.md),
    num_warps and num_stages (default 3 for INT4, 2 for bf16) apply to "tile" and bf16; num_stages is also the warp
    kernel's count of shared buffers (default decode_int4_warp.STAGES).
    maxnreg: registers per thread cap of the decode kernel (ptxas .maxnreg; GPU only, the interpreter ignores
    it), e.g. 128 for 4 programs of 4 warps per SM.
    impl: INT4 kernel, "warp" (decode_int4_warp.py: equal runs of 32-token steps, one warp each, operands in
    registers; CUDA, pages of whole steps, q plain or already rotated) or "tile" (decode_int4.py, also under the
    interpreter). Default: "warp" where it fits.
    """

    num_splits: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int | None = None
    maxnreg: int | None = None
    impl: str | None = None


DEFAULT_DECODE = DecodeTuning()


def _window_piece(cache: LayerCache, ring: Ring, q_plain: torch.Tensor | None, k_new: torch.Tensor | None,
                  v_new: torch.Tensor | None, keep_slots: torch.Tensor | None, sm_scale: float, group: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 rows' partial (o [B, Hq, D], lse [B, Hq]) from _window_piece_kernel, ring stores included."""
    fmt, k_mean = cache.fmt, cache.k_mean
    win, win_strides = ring_args(cache, ring)
    if keep_slots is not None:
        assert flat_slots(win[0]) and keep_slots.dtype == torch.int64
    if q_plain is None or k_new is None or v_new is None:
        raise ValueError("decode_attention(ring=...) needs q_plain, k_new and v_new (raw bf16) for the bf16 keys")
    assert q_plain.dtype == k_new.dtype == v_new.dtype == torch.bfloat16
    assert q_plain.stride(-1) == 1 and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
    bsz, hq, d = q_plain.shape
    shift = fmt.k_center and k_mean is not None  # as in write_kv: no mean, nothing was subtracted
    wo = torch.empty(bsz, hq, d, dtype=torch.float32, device=q_plain.device)
    wl = torch.empty(bsz, hq, dtype=torch.float32, device=q_plain.device)
    rows = fmt.sinks + fmt.window + 1  # and the new token
    _window_piece_kernel[(bsz, hq // group)](
        wo, wl, q_plain, k_new, v_new, *win,
        k_mean.float().contiguous() if shift else wo, ring.rows if keep_slots is None else keep_slots,
        q_plain.stride(0), q_plain.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        *win_strides, sm_scale * LOG2E, HQ=hq, G=group, GP=max(16, triton.next_power_of_2(group)), D=d,
        S=fmt.sinks, W=fmt.window, BLOCK_W=min(64, max(16, triton.next_power_of_2(rows))), SHIFT=shift,
        KEEP=keep_slots is not None, num_warps=1)
    return wo, wl


def decode_attention(q: torch.Tensor, cache: LayerCache, page_table: torch.Tensor, seq_lens: torch.Tensor,
                     sm_scale: float, *, out: torch.Tensor | None = None, q_rotated: bool = False,
                     max_context: int | None = None, ring: Ring | None = None, q_plain: torch.Tensor | None = None,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     keep_slots: torch.Tensor | None = None, tuning: DecodeTuning = DEFAULT_DECODE) -> torch.Tensor:
    """o [B, Hq, D] bf16 of one new query per request over its seq_lens[b] cached tokens in cache (its pages,
    params, format, page size; tuning: DecodeTuning).

    q_rotated: q (bf16 or fp32) is already R q for a rotated format (write_kv(q=...)), so the
    kernel does not rotate it again.
    max_context (default page_table width * page_size) bounds the lengths for the default splits / programs.
    ring (fmt.window): seq_lens[b] is the INT4 length P - ring.lens[b], read from ring.sinks[b] on (with sinks);
    the query also attends to the valid slots of cache's ring (sinks and window) and to the new token itself
    (k_new, v_new [B, Hkv, D]), raw bf16 rows met by q_plain (the raw bf16 query [B, Hq, D]); cache.k_mean (the
    one write_kv used) puts their scores in the INT4 ones' space.
    k_new, v_new and q_plain may be strided views. keep_slots (int64 [B], flat ring slots as write_window
    takes them): the same launch then stores each new token there, after reading the ring.
    No host reads of seq_lens: the grid depends on shapes only, so a CUDA graph captured for a batch
    size replays for any lengths; the split workspaces are allocated here (from the graph pool when
    capturing). Run it once outside a capture first (Triton compiles, Hadamard matrix is uploaded).
    """
    fmt, page_size, k_cache, v_cache = cache.fmt, cache.page_size, cache.k, cache.v
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    assert group * hkv == hq and d % 32 == 0 and d == fmt.head_dim and page_size & (page_size - 1) == 0
    assert q.stride(-1) == 1
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=torch.bfloat16, device=q.device)
    window = ring is not None
    starts = ring.sinks if ring is not None else None  # INT4 reads begin after the bf16 sinks
    quant = fmt.quantized
    num_splits, block_n, num_warps, num_stages, maxnreg, impl = (
        tuning.num_splits, tuning.block_n, tuning.num_warps, tuning.num_stages, tuning.maxnreg, tuning.impl)
    warp_fits = (not INTERPRET and q.is_cuda and warp_kernel_fits(page_size, d, group, bsz)
                 and (q_rotated or not fmt.rotated))
    impl = impl or ("warp" if quant and warp_fits else "tile")
    if impl not in ("warp", "tile") or impl == "warp" and not warp_fits:
        raise ValueError(f"impl={impl!r}: 'tile', or 'warp' on CUDA for pages of whole 16-token tiles, head_dim 64 "
                         "or 128, GQA <= 16, batch <= 1024 and, for a rotated format, q already rotated")
    warp = quant and impl == "warp"
    if block_n is None:  # measured on H100 (docs/kernels.md)
        block_n = 16 if INTERPRET else (128 if quant else 64)
    if num_stages is None:
        num_stages = 3 if quant else 2
    gp = query_rows(group) if quant else max(16, triton.next_power_of_2(group))
    kp, vp, s_ps, s_ph, hmat, full, inv = cache_args(cache)
    meta = pl = po = out
    ctx = max_context if max_context is not None else page_table.shape[1] * page_size
    # the bf16 rows first: their partial is one more piece for whoever combines (no dependency on the INT4 launch)
    wo, wl = _window_piece(cache, ring, q_plain, k_new, v_new, keep_slots, sm_scale, group) if window else (out, out)
    if warp:
        programs = bsz * hkv * num_splits if num_splits else warp_programs(q.device, bsz, hkv, ctx, d, gp, maxnreg)
        # the kernel combines each pair's pieces (and the window's) itself, unless the output must be rotated back
        combine = not fmt.rotate_v
        po, pl, meta = launch_warp_decode(q, cache, page_table, seq_lens, sm_scale * LOG2E, out, combine, programs,
                                          gp, maxnreg, starts, (wo, wl) if window else None,
                                          tuning.num_stages or WARP_STAGES)
        partials = MAX_PIECES  # at most, per pair; the kernel records each one's count
        reduce = not combine
    else:
        if num_splits is None:
            num_splits = choose_num_splits(bsz, hkv, ctx, q.device, block_n, quant)
        partials = num_splits
        final = num_splits == 1 and not window
        reduce = not final
        if not final:
            po = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=q.device)
            pl = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
        grid = (bsz, hkv, num_splits)
        strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                   v_cache.stride(1))
        if quant:
            decode_int4_kernel[grid](
                q, k_cache, v_cache, kp, vp, page_table, seq_lens, seq_lens if starts is None else starts, hmat, out,
                po, pl, *strides, s_ps, s_ph,
                page_table.stride(0), out.stride(0), out.stride(1), sm_scale * LOG2E, inv,
                HQ=hq, G=group, GP=gp, D=d, PAGE=page_size, ROT_Q=fmt.rotated and not q_rotated,
                ROT_V=fmt.rotate_v, FULL=full, SPLITS=num_splits, FINAL=final, BLOCK_N=block_n,
                START=starts is not None, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        else:
            _decode_bf16_kernel[grid](
                q, k_cache, v_cache, page_table, seq_lens, out, po, pl, *strides, page_table.stride(0),
                out.stride(0), out.stride(1), sm_scale * LOG2E, HQ=hq, G=group, GP=gp, D=d, PAGE=page_size,
                SPLITS=num_splits, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
    if reduce:
        _reduce_kernel[(bsz, hkv)](
            po, pl, meta, hmat, out, out.stride(0), out.stride(1), inv, wo, wl, HQ=hq, G=group, GP=gp, D=d,
            SPLITS=partials, SP2=triton.next_power_of_2(partials), PIECES=warp, ROT_V=fmt.rotate_v, FULL=full,
            WINDOW=window, num_warps=4)
    return out
