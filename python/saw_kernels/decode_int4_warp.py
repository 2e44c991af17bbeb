"""Paged INT4 decode attention, one warp per (request, KV head, split), mma operands in registers.

The Triton kernel (`decode_int4.py`) stages each tile through shared memory: codes by cp.async,
then as fp16 for wgmma, about 9 bytes of shared-memory traffic per byte read from HBM, which
caps it near 60 % of copy bandwidth on an H100. Here (Gluon, mma.sync m16n8k16) the codes pass
through a two-step shared buffer (cp.async; each thread reads back only the words it copied) into
the mma fragment registers, and no fp16 tile is ever stored:

  S^T [tokens, GP] = K [tokens, D/2] q^T       (lo and hi nibbles as two products)
  o^T [D/2, GP]   += V^T [D/2, tokens] P^T     (again per nibble)

A K row's 64 bytes are read 16 per thread and a V row's 8 per thread. The dims inside an mma
fragment are not consecutive, so the kernel names the dims in a permuted order: logical column L
of K is byte phys(L) of the row (q is gathered in the same order), and logical row l of o^T is
byte vphys(l) of V (the output is stored back in byte order). Both maps only permute index bits,
so the reshapes and permutes that express them move no data.

Codes become exact fp16 as in decode_int4.py (1024 + c, 1024 + 16 c), with q scaled per query
into [2^13, 2^14). Each program writes the split partial (o, lse) that `_reduce_kernel` combines.
Needs mma.sync and cp.async (sm_80+); GPU only (Gluon does not run under the interpreter).
"""

from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from saw_kernels._common import num_sms
from saw_kernels.decode_int4 import CODES_F16_ASM

# Two tokens' words A ($8) and B ($9): register i of each output pairs byte i of A (low half) with byte i
# of B (high half); prmt puts them in bytes 0 and 2, the masks keep one nibble of each.
_V_ASM = gl.constexpr("""{
        .reg .b32 t0, t1, t2, t3;
        prmt.b32 t0, $8, $9, 0x0400;
        prmt.b32 t1, $8, $9, 0x0501;
        prmt.b32 t2, $8, $9, 0x0602;
        prmt.b32 t3, $8, $9, 0x0703;
        lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, t2, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $3, t3, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $4, t0, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $5, t1, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $6, t2, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $7, t3, 0x00F000F0, 0x64006400, 0xEA;
        }""")


@gluon.jit
def _codes_f16(words, lay3: gl.constexpr, PAIRS: gl.constexpr):
    """int32 words [N, W] (layout SliceLayout(2, lay3)) -> (1024 + low nibble, 1024 + 16 * high nibble)
    as exact fp16 [N, 4 W] in byte order. Each word is broadcast over its 4 bytes so that the asm sees
    one word per 4 elements; with PAIRS the lowest register bit of lay3 is a token's parity and each
    output register holds the same byte of two tokens (the pairs mma wants along tokens)."""
    n: gl.constexpr = words.shape[0]
    w: gl.constexpr = words.shape[1]
    x = gl.broadcast(gl.expand_dims(words, 2), gl.full([n, w, 4], 0, gl.int32, layout=lay3))[0]
    if PAIRS:
        lo, hi = gl.inline_asm_elementwise(_V_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [x],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=8)
    else:
        lo, hi = gl.inline_asm_elementwise(CODES_F16_ASM, "=r,=r,=r,=r,r,r,r,r", [x],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    return gl.reshape(lo, [n, 4 * w]), gl.reshape(hi, [n, 4 * w])


@gluon.jit
def _k_operand(x, STEP: gl.constexpr, KCH: gl.constexpr, dot_a: gl.constexpr):
    """[STEP, D/2] fp16 in byte order (thread t holds bytes 4 KCH t ...) -> the mma A operand with
    logical column L = 16 k + 8 h + 2 t + j holding byte 4 KCH t + 4 k + 2 h + j."""
    x = gl.reshape(x, [STEP, 4, KCH, 2, 2])
    x = gl.permute(x, [0, 2, 3, 1, 4])
    return gl.convert_layout(gl.reshape(x, [STEP, 16 * KCH]), dot_a, assert_trivial=True)


@gluon.jit
def _v_operand(x, STEP: gl.constexpr, MT: gl.constexpr, dot_a: gl.constexpr):
    """[STEP, D/2] fp16 in byte order (lane group g holds bytes 2 MT g ...) -> V^T as the mma A
    operand, logical row l = 16 m + 8 r + g holding byte 2 MT g + 2 m + r."""
    x = gl.reshape(x, [STEP, 8, MT, 2])
    x = gl.permute(x, [2, 3, 1, 0])
    return gl.convert_layout(gl.reshape(x, [16 * MT, STEP]), dot_a, assert_trivial=True)


@gluon.jit
def _page(pt_row, n0, end, PAGE: gl.constexpr):
    """Cache page of the step at n0 (0 past the end; no step straddles pages: PAGE % STEP == 0)."""
    return gl.load(pt_row + n0 // PAGE, mask=n0 < end, other=0).to(gl.int64)


@gluon.jit
def _copy_step(k_buf, v_buf, kc_ptr, vc_ptr, page, n0, k_off, v_off, s_kcs, s_vcs, PAGE: gl.constexpr):
    """Start copying one step's K and V codes (int32 words) into shared buffers (cp.async, one group).
    *_off are the offsets of the step's rows from its first row, slot page * PAGE + n0 % PAGE. Codes are
    copied unmasked: rows past the end are in the request's last page (or in page 0 past its last
    step), their scores are masked, and any code makes a finite value."""
    first = page * PAGE + n0 % PAGE
    async_copy.async_copy_global_to_shared(k_buf, kc_ptr + first * s_kcs + k_off)
    async_copy.async_copy_global_to_shared(v_buf, vc_ptr + first * s_vcs + v_off)
    async_copy.commit_group()


@gluon.jit
def _load_params(kp_ptr, vp_ptr, page, n0, end, tp, p_off, s_ps, PAGE: gl.constexpr):
    """One step's (scale, lo) words of K and V (p_off's layout), masked past the end: there they could
    be anything, NaN included (tp: the step's tokens)."""
    first = page * PAGE + n0 % PAGE
    mp = tp < end - n0
    return (gl.load(kp_ptr + first * s_ps + p_off, mask=mp, other=0),
            gl.load(vp_ptr + first * s_ps + p_off, mask=mp, other=0))


@gluon.jit
def _half(w, HI: gl.constexpr):
    """fp16 half of a (scale, lo) word as fp32."""
    if HI:
        w = w >> 16
    return (w & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)


@gluon.jit
def decode_int4_warp_kernel(
    q_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, pt_ptr, len_ptr, po_ptr, pl_ptr,
    s_qb, s_qh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, s_ptb, qk_scale,
    HQ: gl.constexpr, G: gl.constexpr, GP: gl.constexpr, D: gl.constexpr, PAGE: gl.constexpr,
    SPLITS: gl.constexpr, STEP: gl.constexpr,
    mma: gl.constexpr, lay_k3: gl.constexpr, lay_v3: gl.constexpr, lay_vw: gl.constexpr, lay_q: gl.constexpr,
    sh_k: gl.constexpr, sh_v: gl.constexpr, NBUF: gl.constexpr,
):
    D2: gl.constexpr = D // 2
    KCH: gl.constexpr = D2 // 16  # k16 chunks (and m16 tiles) per nibble half
    BV: gl.constexpr = D2 // 8  # V bytes per thread per token
    W: gl.constexpr = D2 // 4  # int32 words per row
    OFF: gl.constexpr = 1024.0
    # The running max may lag the true one by up to LAZY (log2 units): p <= 2^LAZY, so fp16(p s_v)
    # stays finite for V scales below 65504 / 16 (rows spanning ~60k).
    LAZY: gl.constexpr = 4.0
    dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    dot_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    lay_kw: gl.constexpr = gl.SliceLayout(2, lay_k3)

    b = gl.program_id(0)
    kh = gl.program_id(1)
    sp = gl.program_id(2)

    seq_len = gl.load(len_ptr + b)
    chunk = gl.cdiv(gl.cdiv(seq_len, SPLITS), STEP) * STEP
    start = sp * chunk
    end = gl.minimum(start + chunk, seq_len)
    pt_row = pt_ptr + b.to(gl.int64) * s_ptb

    # each layout's tokens of a step, and their rows' offsets from the step's first row (loop-invariant)
    tk = gl.arange(0, STEP, layout=gl.SliceLayout(1, lay_kw))
    tv = gl.arange(0, STEP, layout=gl.SliceLayout(1, lay_vw))
    tp = gl.arange(0, STEP, layout=gl.SliceLayout(1, mma))  # also the rows of S^T
    k_off = (tk * s_kcs + kh * s_kch)[:, None] + gl.arange(0, W, layout=gl.SliceLayout(0, lay_kw))[None, :]
    v_off = (tv * s_vcs + kh * s_vch)[:, None] + gl.arange(0, W, layout=gl.SliceLayout(0, lay_vw))[None, :]
    p_off = tp * s_ps + kh * s_ph

    # Software pipeline: codes of steps i + 1 ... i + NBUF - 1 are in flight (cp.async into shared
    # buffers, which cost no registers) while step i computes; the (scale, lo) words of step i + 1
    # load into registers. Each thread reads back only the words it copied, so no barrier is needed
    # (the compiler still places one per step; for one warp it is cheap).
    k_smem = gl.allocate_shared_memory(gl.int32, [NBUF, STEP, W], sh_k)
    v_smem = gl.allocate_shared_memory(gl.int32, [NBUF, STEP, W], sh_v)
    for j in gl.static_range(NBUF - 1):
        _copy_step(k_smem.index(j), v_smem.index(j), kc_ptr, vc_ptr, _page(pt_row, start + j * STEP, end, PAGE),
                   start + j * STEP, k_off, v_off, s_kcs, s_vcs, PAGE)
    page_c = _page(pt_row, start + (NBUF - 1) * STEP, end, PAGE)  # of the next step to copy
    kw_nx, vw_nx = _load_params(kp_ptr, vp_ptr, _page(pt_row, start, end, PAGE), start, end, tp, p_off, s_ps, PAGE)
    page_p = _page(pt_row, start + STEP, end, PAGE)  # of the next step's (scale, lo)
    # q, while the first steps load: per-query scale r into [2^13, 2^14), sum(q), the 1024-offset term
    g = gl.arange(0, GP, layout=gl.SliceLayout(1, lay_q))
    gm = g < G
    c = gl.arange(0, D2, layout=gl.SliceLayout(0, lay_q))
    q_row = q_ptr + b.to(gl.int64) * s_qb + (kh * G + g) * s_qh
    q_lo = gl.load(q_row[:, None] + c[None, :], mask=gm[:, None], other=0.0).to(gl.float32)
    q_hi = gl.load(q_row[:, None] + D2 + c[None, :], mask=gm[:, None], other=0.0).to(gl.float32)
    q_sum = gl.sum(q_lo, 1) + gl.sum(q_hi, 1)
    amax = gl.maximum(gl.max(gl.abs(q_lo), 1), gl.max(gl.abs(q_hi), 1))
    r = gl.exp2(13.0 - gl.floor(gl.log2(gl.maximum(amax, 1e-30))))
    q_off = OFF * (gl.sum((q_lo * r[:, None]).to(gl.float16).to(gl.float32), 1)
                   + gl.sum((q_hi * (r * 0.0625)[:, None]).to(gl.float16).to(gl.float32), 1))
    # q^T as the B operand [D2, GP], rows in the K operand's logical order
    lb = gl.arange(0, D2, layout=gl.SliceLayout(1, dot_b))
    phys = 4 * KCH * ((lb % 8) // 2) + 4 * (lb // 16) + 2 * ((lb // 8) % 2) + lb % 2
    nb = gl.arange(0, GP, layout=gl.SliceLayout(0, dot_b))
    qb_ptr = q_ptr + b.to(gl.int64) * s_qb + (kh * G + nb) * s_qh
    qb_m = (nb < G)[None, :]
    rb = gl.convert_layout(r, gl.SliceLayout(0, dot_b))
    qt_lo = (gl.load(qb_ptr[None, :] + phys[:, None], mask=qb_m, other=0.0).to(gl.float32) * rb[None, :]
             ).to(gl.float16)
    qt_hi = (gl.load(qb_ptr[None, :] + D2 + phys[:, None], mask=qb_m, other=0.0).to(gl.float32)
             * (rb * 0.0625)[None, :]).to(gl.float16)
    # per query: score = s_k (qc / r - q_off / r) + lo_k sum(q), times qk_scale (folded into s_k and sum(q));
    # r is a power of two, so the 1024 terms cancel in one exact-operand FMA
    inv_r = gl.convert_layout(1.0 / r, gl.SliceLayout(0, mma))
    q_off = gl.convert_layout(-q_off / r, gl.SliceLayout(0, mma))
    q_sum = gl.convert_layout(q_sum * qk_scale, gl.SliceLayout(0, mma))

    m_i = gl.full([GP], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma))
    l_rows = gl.zeros([STEP, GP], gl.float32, layout=mma)  # sum p, sum fp16(p s_v), sum p lo_v per row
    ps_rows = gl.zeros([STEP, GP], gl.float32, layout=mma)
    plo_rows = gl.zeros([STEP, GP], gl.float32, layout=mma)
    acc_lo = gl.zeros([D2, GP], gl.float32, layout=mma)  # o^T halves, rows in V's logical order
    acc_hi = gl.zeros([D2, GP], gl.float32, layout=mma)

    for n0 in range(start, end, STEP):
        i = (n0 - start) // STEP
        page_c2 = _page(pt_row, n0 + NBUF * STEP, end, PAGE)
        _copy_step(k_smem.index((i + NBUF - 1) % NBUF), v_smem.index((i + NBUF - 1) % NBUF), kc_ptr, vc_ptr, page_c,
                   n0 + (NBUF - 1) * STEP, k_off, v_off, s_kcs, s_vcs, PAGE)
        page_c = page_c2
        kw, vw = kw_nx, vw_nx
        page_p2 = _page(pt_row, n0 + 2 * STEP, end, PAGE)
        kw_nx, vw_nx = _load_params(kp_ptr, vp_ptr, page_p, n0 + STEP, end, tp, p_off, s_ps, PAGE)
        page_p = page_p2
        async_copy.wait_group(NBUF - 1)  # step i's group has landed
        k_codes = k_smem.index(i % NBUF).load(lay_kw)
        v_codes = v_smem.index(i % NBUF).load(lay_vw)
        k_lo, k_hi = _codes_f16(k_codes, lay_k3, False)
        qc = mma_v2(_k_operand(k_lo, STEP, KCH, dot_a), qt_lo, gl.zeros([STEP, GP], gl.float32, layout=mma))
        qc = mma_v2(_k_operand(k_hi, STEP, KCH, dot_a), qt_hi, qc)  # r (q . c) + 1024 sum(fp16 q)
        k_s = _half(kw, False) * qk_scale
        k_m = _half(kw, True)
        s = k_s[:, None] * (qc * inv_r[None, :] + q_off[None, :]) + k_m[:, None] * q_sum[None, :]
        s = gl.where((tp < end - n0)[:, None], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 0))
        if gl.max(m_new - m_i, 0) > LAZY:  # rescale only when a max grew by more than LAZY (log2)
            alpha = gl.exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))
            acc_lo = acc_lo * alpha[None, :]
            acc_hi = acc_hi * alpha[None, :]
            l_rows = l_rows * alpha[None, :]
            ps_rows = ps_rows * alpha[None, :]
            plo_rows = plo_rows * alpha[None, :]
            m_i = m_new
        p = gl.exp2(s - gl.where(m_i == float("-inf"), 0.0, m_i)[None, :])
        pw = (p * _half(vw, False)[:, None]).to(gl.float16)
        pt = gl.convert_layout(pw, dot_b)
        v_words = gl.convert_layout(v_codes, gl.SliceLayout(2, lay_v3), assert_trivial=True)  # register order
        v_lo, v_hi = _codes_f16(v_words, lay_v3, True)
        acc_lo = mma_v2(_v_operand(v_lo, STEP, KCH, dot_a), pt, acc_lo)
        acc_hi = mma_v2(_v_operand(v_hi, STEP, KCH, dot_a), pt, acc_hi)
        l_rows += p
        ps_rows += pw.to(gl.float32)
        plo_rows += p * _half(vw, True)[:, None]

    l_i = gl.sum(l_rows, 0)
    ps = gl.sum(ps_rows, 0)
    plo = gl.sum(plo_rows, 0)
    l_safe = gl.where(l_i > 0, l_i, 1.0)
    o_lo = (acc_lo - OFF * ps[None, :] + plo[None, :]) / l_safe[None, :]
    o_hi = ((acc_hi - OFF * ps[None, :]) * 0.0625 + plo[None, :]) / l_safe[None, :]
    # partial o [B, Hq, SPLITS, D] fp32 in byte order, and lse (log2 domain)
    lr = gl.arange(0, D2, layout=gl.SliceLayout(1, mma))
    vphys = BV * (lr % 8) + 2 * (lr // 16) + (lr // 8) % 2
    n = gl.arange(0, GP, layout=gl.SliceLayout(0, mma))
    nm = n < G
    row = (b.to(gl.int64) * HQ + kh * G + n) * SPLITS + sp
    o_ptr = po_ptr + row[None, :] * D + vphys[:, None]
    gl.store(o_ptr, o_lo, mask=nm[None, :])
    gl.store(o_ptr + D2, o_hi, mask=nm[None, :])
    gl.store(pl_ptr + row, m_i + gl.log2(l_safe) + gl.where(l_i > 0, 0.0, float("-inf")), mask=nm)


@functools.cache  # built once per shape, not at every (eager) launch
def warp_layouts(step: int, head_dim: int, nbuf: int) -> dict[str, gl.constexpr]:
    """The kernel's register and shared layouts (one warp) for STEP tokens per step, head_dim, and
    nbuf shared buffers per operand (a power of two).

    Codes are [tokens, words, 4 bytes]. K: lane 4 g + t holds rows g, g + 8, ... and words
    KCH t ... KCH t + KCH - 1. V: lane 4 g + t holds tokens 2 t, 2 t + 1, 2 t + 8, 2 t + 9, ... and
    words WV g ... WV g + WV - 1, the token parity lowest in registers (lay_v3) or the words (lay_vw,
    for the load).
    """
    d2 = head_dim // 2
    kch, wv = d2 // 16, d2 // 32
    word_bits = [1 << i for i in range(wv.bit_length() - 1)]
    token_bits = [8 << i for i in range(step.bit_length() - 4)]
    v_lanes = [[2, 0], [4, 0], [0, wv], [0, 2 * wv], [0, 4 * wv]]
    return dict(
        mma=gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]),
        lay_k3=gl.BlockedLayout([1, kch, 4], [8, 4, 1], [1, 1, 1], [2, 1, 0]),
        lay_v3=gl.DistributedLinearLayout(
            reg_bases=[[1, 0, 0], [0, 0, 1], [0, 0, 2]] + [[0, w, 0] for w in word_bits]
            + [[t, 0, 0] for t in token_bits],
            lane_bases=[lane + [0] for lane in v_lanes], warp_bases=[], block_bases=[], shape=[step, d2 // 4, 4]),
        lay_vw=gl.DistributedLinearLayout(
            reg_bases=[[0, w] for w in word_bits] + [[1, 0]] + [[t, 0] for t in token_bits],
            lane_bases=v_lanes, warp_bases=[], block_bases=[], shape=[step, d2 // 4]),
        lay_q=gl.BlockedLayout([1, 4], [1, 32], [1, 1], [1, 0]),
        # shared buffers [NBUF, step, words]: K row-major; V in its registers' order (a lane's words, then
        # the lanes, then its tokens), so that every lane's 8-byte accesses fall in distinct banks
        sh_k=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        sh_v=gl.SharedLinearLayout(
            offset_bases=[[0, w] for w in word_bits] + [[2, 0], [4, 0]] + [[0, wv << i] for i in range(3)]
            + [[1, 0]] + [[t, 0] for t in token_bits]),
        NBUF=nbuf,
    )


STEP = 16  # tokens per step: one mma M tile; pages must hold whole steps
# Warps of the compiled kernel an SM holds, from its registers (recorded at each launch, per device,
# head_dim, query rows and register cap): 152 registers on sm_90 with triton 3.6, so 3 per scheduler,
# 12 per SM (13 splits of 16 x 16k, one wave if 13 fitted, took 168 us against 123 us for 12).
_RESIDENT: dict[tuple[int | None, int, int, int | None], int] = {}
SPLIT_COST = 6  # steps; fits the split sweeps in warp_num_splits' docstring
# Shorter splits cost more than the model says: 64 splits of one step at batch 1 x 1k took 22 us,
# the reduce summing 64 partials per query (9.9 us for the tile kernel).
MIN_SPLIT_STEPS = 8
NBUF = 2  # shared buffers per operand: steps i + 1 ... i + NBUF - 1 in flight while step i computes


def warp_kernel_fits(page_size: int, head_dim: int, group: int) -> bool:
    """Shapes this kernel serves (others run decode_int4.py)."""
    return page_size % STEP == 0 and head_dim in (64, 128) and group <= 16


def warp_num_splits(programs: int, max_context: int, device: torch.device, head_dim: int, group_rows: int,
                    maxnreg: int | None = None) -> int:
    """Splits per (request, KV head), from shapes only (graph-safe).

    Each program is one warp and keeps its SM slot until its split is done, so the time is modelled
    as waves x (steps per split + a fixed cost of SPLIT_COST steps per program: prologue, partial
    write, its share of the reduce). H100, 2026-11-24, int4-bdr, 12 x 132 warp slots
    (bench/results/kernels-h100-2026-11-24-s6/run6-split-sweep): at 64 x 4k, 2 / 3 / 4 / 6 splits took
    136 / 121 / 155 / 129 us; at 16 x 16k, 8 / 12 / 13 / 16 took 138 / 123 / 168 / 155 us; at 128 x 2k,
    1 / 2 / 3 / 4 / 5 took 136 / 154 / 130 / 143 / 155 us.
    """
    slots = num_sms(device) * _RESIDENT.get((device.index, head_dim, group_rows, maxnreg), 12)
    steps = math.ceil(max_context / STEP)

    def cost(splits: int) -> int:
        return math.ceil(programs * splits / slots) * (math.ceil(steps / splits) + SPLIT_COST)

    most = max(1, min(64, steps // MIN_SPLIT_STEPS))
    return min(range(1, most + 1), key=cost)  # the first (fewest splits) of equal costs


def launch_warp_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kp: torch.Tensor,
                       vp: torch.Tensor, s_ps: int, s_ph: int, page_table: torch.Tensor, seq_lens: torch.Tensor,
                       page_size: int, qk_scale: float, po: torch.Tensor, pl: torch.Tensor, num_splits: int,
                       group_rows: int, maxnreg: int | None = None) -> None:
    """Split partials po [B, Hq, S, D] fp32 and pl [B, Hq, S] of q [B, Hq, D] (plain, or already rotated)
    over uint8 pages [slots, Hkv, D/2] (read as int32 words) and (scale, lo) words kp / vp."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    kw, vw = k_cache.view(torch.int32), v_cache.view(torch.int32)
    compiled = decode_int4_warp_kernel[(bsz, hkv, num_splits)](
        q, kw, vw, kp, vp, page_table, seq_lens, po, pl, q.stride(0), q.stride(1), kw.stride(0), kw.stride(1),
        vw.stride(0), vw.stride(1), s_ps, s_ph, page_table.stride(0), qk_scale,
        HQ=hq, G=hq // hkv, GP=group_rows, D=d, PAGE=page_size, SPLITS=num_splits, STEP=STEP,
        **warp_layouts(STEP, d, NBUF), num_warps=1, maxnreg=maxnreg)
    # each of an SM's 4 schedulers has 16k registers, given out in units of 256 per warp
    regs_per_warp = math.ceil(compiled.n_regs * 32 / 256) * 256
    _RESIDENT[(q.device.index, d, group_rows, maxnreg)] = min(32, 4 * (16384 // regs_per_warp))
