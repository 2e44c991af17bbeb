"""Paged INT4 decode attention: equal runs of 32-token steps, one warp each, mma operands in registers.

The Triton kernel (`decode_int4.py`) stages each tile through shared memory: codes by cp.async,
then as fp16 for wgmma, about 9 bytes of shared-memory traffic per byte read from HBM, which
caps it near 60 % of copy bandwidth on an H100. Here (Gluon, mma.sync m16n8k16) the codes and their
(scale, lo) words pass through shared buffers (cp.async, STAGES steps; each thread reads back only the
words it copied) into the mma fragment registers, and no fp16 tile is ever stored:

  S^T [tokens, GP] = K [tokens, D/2] q^T       (lo and hi nibbles as two products)
  o^T [D/2, GP]   += V^T [D/2, tokens] P^T     (again per nibble)

A K row's 64 bytes are read 16 per thread and a V row's 8 per thread. The dims inside an mma
fragment are not consecutive, so the kernel names the dims in a permuted order: logical column L
of K is byte phys(L) of the row (q is gathered in the same order), and logical row l of o^T is
byte vphys(l) of V (the output is stored back in byte order). Both maps only permute index bits,
so the reshapes and permutes that express them move no data.

Codes become exact fp16 as in decode_int4.py (1024 + c, 1024 + 16 c), with q scaled per query
into [2^13, 2^14). A step is two M tiles of 16 tokens (one with 16 query rows: warp_step), each
within one page, so pages of 16 tokens serve.

The grid is persistent (stream-K): one program per warp slot of the GPU, each walking an equal run of
a KV head's steps across request boundaries, so a batch of ragged lengths keeps every warp busy to the
end (splitting each request alike left the long ones running alone: 21-29 % slower on ragged batches).
A run writes one partial (o, lse) per request it touches, and the piece of a (request, KV head) that lands
last, by an arrival count, combines them into the output in the same launch (a separate reduce launch cost
4-7 us more at 64 x 4k on the H100), with the bf16 window's partial when there is one (an earlier launch
attends it). With rotate_v the pieces go to `_reduce_kernel` instead, which also rotates the output back.
The cut is computed on the GPU from the lengths, so a CUDA graph replays for any lengths.
Needs mma.sync and cp.async (sm_80+); GPU only (Gluon does not run under the interpreter).
"""

from __future__ import annotations

import functools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from saw_kernels._common import cache_args, num_sms
from saw_kernels.decode_int4 import CODES_F16_ASM
from saw_kv.cache import LayerCache

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
def _add(a, b):
    return a + b


@gluon.jit
def _run_of(o, size, extra):
    """The run holding step o of a head's work, runs 0 .. extra - 1 taking size + 1 steps and the rest size."""
    big = extra * (size + 1)
    return gl.where(o < big, o // (size + 1), extra + (o - big) // size)


@gluon.jit
def _next_step(b, n0, n, len_ptr, B, STEP: gl.constexpr):
    """The cursor (request, first token, request length) of a head's step after (b, n0)."""
    n0 = n0 + STEP
    if n0 >= gl.maximum(n, 1):
        n0 = 0
        b = b + 1
        n = gl.load(len_ptr + b, mask=b < B, other=0)
    return b, n0, n


@gluon.jit
def _pages(pt_ptr, b, n0, n, live, s_ptb, PAGE: gl.constexpr, STEP: gl.constexpr, HALF: gl.constexpr):
    """Cache pages of the step at token n0 of request b (length n): of its first HALF tokens (one mma M tile) and of
    the rest, the same page twice where PAGE % STEP == 0; page 0 for a part this program will not compute (live
    false) or past the request or the batch."""
    row = pt_ptr + b.to(gl.int64) * s_ptb
    page_a = gl.load(row + n0 // PAGE, mask=live & (n0 < n), other=0).to(gl.int64)
    page_b = page_a
    if PAGE % STEP != 0:
        page_b = gl.load(row + (n0 + HALF) // PAGE, mask=live & (n0 + HALF < n), other=0).to(gl.int64)
    return page_a, page_b


@gluon.jit
def _row_slots(page_a, page_b, n0, second, PAGE: gl.constexpr, STEP: gl.constexpr, HALF: gl.constexpr):
    """Slot of the first row of each row's part (second: the row is at or past HALF), whose rows are consecutive
    slots of one page."""
    first_a = page_a * PAGE + (n0 & (PAGE - 1))
    first_b = first_a + HALF
    if PAGE % STEP != 0:
        first_b = page_b * PAGE + ((n0 + HALF) & (PAGE - 1))
    return gl.where(second, first_b, first_a)


@gluon.jit
def _copy_step(k_buf, v_buf, kp_buf, vp_buf, kc_ptr, vc_ptr, kp_ptr, vp_ptr, page_a, page_b, n0, n, k_off, v_off,
               tk, tv, tp, p_off, S_KCS: gl.constexpr, S_VCS: gl.constexpr, S_PS: gl.constexpr, PAGE: gl.constexpr,
               STEP: gl.constexpr, HALF: gl.constexpr):
    """Start copying one step's K and V codes (int32 words) and (scale, lo) words into shared buffers
    (cp.async, one group). t*: each layout's rows of the step; *_off: their offsets from the first row of
    their part (_row_slots). Codes are copied unmasked: rows past a request's end n are in its last page (or in page 0),
    their scores are masked, and any code makes a finite value. The (scale, lo) words there could be
    anything, NaN included, so they are zero-filled."""
    k_rows = _row_slots(page_a, page_b, n0, tk >= HALF, PAGE, STEP, HALF)
    v_rows = _row_slots(page_a, page_b, n0, tv >= HALF, PAGE, STEP, HALF)
    p_rows = _row_slots(page_a, page_b, n0, tp >= HALF, PAGE, STEP, HALF)
    async_copy.async_copy_global_to_shared(k_buf, kc_ptr + (k_rows * S_KCS)[:, None] + k_off)
    async_copy.async_copy_global_to_shared(v_buf, vc_ptr + (v_rows * S_VCS)[:, None] + v_off)
    mp = tp < n - n0
    async_copy.async_copy_global_to_shared(kp_buf, kp_ptr + p_rows * S_PS + p_off, mask=mp)
    async_copy.async_copy_global_to_shared(vp_buf, vp_ptr + p_rows * S_PS + p_off, mask=mp)
    async_copy.commit_group()


@gluon.jit
def _half(w, HI: gl.constexpr):
    """fp16 half of a (scale, lo) word as fp32."""
    if HI:
        w = w >> 16
    return (w & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)


@gluon.jit
def _query_operands(q_ptr, b, kh, s_qb, s_qh, qk_scale, G: gl.constexpr, GP: gl.constexpr, D2: gl.constexpr,
                    mma: gl.constexpr, lay_q: gl.constexpr):
    """The query group of (b, kh) as the mma B operands q^T [D2, GP] (lo and hi nibble halves, fp16, each
    query scaled by a power of two r into [2^13, 2^14), rows in the K operand's logical order), and per
    query 1 / r, -q_off / r (the 1024 offsets' term) and qk_scale sum(q)."""
    KCH: gl.constexpr = D2 // 16
    OFF: gl.constexpr = 1024.0
    dot_b: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
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
    # score = s_k (qc / r - q_off / r) + lo_k sum(q), times qk_scale (folded into s_k and sum(q));
    # r is a power of two, so the 1024 terms cancel in one exact-operand FMA
    return (qt_lo, qt_hi, gl.convert_layout(1.0 / r, gl.SliceLayout(0, mma)),
            gl.convert_layout(-q_off / r, gl.SliceLayout(0, mma)),
            gl.convert_layout(q_sum * qk_scale, gl.SliceLayout(0, mma)))


@gluon.jit
def _combine_pieces(po_ptr, pl_ptr, wo_ptr, wl_ptr, out_ptr, first_block, pieces, b, kh, s_ob, s_oh,
                    HQ: gl.constexpr, G: gl.constexpr, GP: gl.constexpr, D: gl.constexpr, MAX_PIECES: gl.constexpr,
                    WINDOW: gl.constexpr, lay_o: gl.constexpr, lay_s: gl.constexpr):
    """out (bf16) of pair (b, kh) from its pieces' partials, rows (first_block + i) G + query, and with WINDOW
    the bf16 rows' partial (rows b HQ + query, from an earlier launch). Loads of the pieces go to L2 (.cg):
    other SMs wrote them during this launch, and L1 is not coherent."""
    i = gl.arange(0, MAX_PIECES, layout=gl.SliceLayout(1, lay_s))
    qs = gl.arange(0, GP, layout=gl.SliceLayout(0, lay_s))
    lse = gl.load(pl_ptr + (first_block + i).to(gl.int64)[:, None] * G + qs[None, :],
                  mask=(i < pieces)[:, None] & (qs < G)[None, :], other=float("-inf"), cache_modifier=".cg")
    m = gl.max(lse, 0)
    if WINDOW:
        lse_w = gl.load(wl_ptr + b.to(gl.int64) * HQ + kh * G + qs, mask=qs < G, other=float("-inf"))
        m = gl.maximum(m, lse_w)
    m = gl.where(m == float("-inf"), 0.0, m)
    denom = gl.sum(gl.exp2(lse - m[None, :]), 0)
    if WINDOW:
        denom += gl.exp2(lse_w - m)
    m = gl.convert_layout(m, gl.SliceLayout(0, lay_o))
    d = gl.arange(0, D, layout=gl.SliceLayout(1, lay_o))
    qn = gl.arange(0, GP, layout=gl.SliceLayout(0, lay_o))
    qm = qn < G
    row0 = first_block.to(gl.int64) * G + qn
    acc = gl.zeros([D, GP], gl.float32, layout=lay_o)
    if WINDOW:
        ww = gl.exp2(gl.convert_layout(lse_w, gl.SliceLayout(0, lay_o)) - m)
        w_row = b.to(gl.int64) * HQ + kh * G + qn
        acc += ww[None, :] * gl.load(wo_ptr + w_row[None, :] * D + d[:, None], mask=qm[None, :], other=0.0)
    for i0 in range(0, pieces, 2):  # two pieces' loads in flight (more would cost the main loop registers)
        for u in gl.static_range(2):
            row = row0 + (i0 + u) * G
            use = qm & (i0 + u < pieces)
            w = gl.exp2(gl.load(pl_ptr + row, mask=use, other=float("-inf"), cache_modifier=".cg") - m)
            acc += w[None, :] * gl.load(po_ptr + row[None, :] * D + d[:, None], mask=use[None, :], other=0.0,
                                        cache_modifier=".cg")
    acc = acc / gl.convert_layout(gl.where(denom > 0, denom, 1.0), gl.SliceLayout(0, lay_o))[None, :]
    out = out_ptr + b.to(gl.int64) * s_ob + (kh * G + qn)[None, :] * s_oh + d[:, None]
    gl.store(out, acc.to(gl.bfloat16), mask=qm[None, :])


@gluon.jit
def decode_int4_warp_kernel(
    q_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, pt_ptr, len_ptr, start_ptr, po_ptr, pl_ptr, meta_ptr, cnt_ptr, wo_ptr,
    wl_ptr, out_ptr, B,
    s_qb, s_qh,
    s_ptb, s_ob, s_oh, qk_scale, S_KCS: gl.constexpr, S_KCH: gl.constexpr, S_VCS: gl.constexpr, S_VCH: gl.constexpr,
    S_PS: gl.constexpr, S_PH: gl.constexpr, HQ: gl.constexpr, G: gl.constexpr, GP: gl.constexpr, D: gl.constexpr,
    PAGE: gl.constexpr, STEP: gl.constexpr, STAGES: gl.constexpr, MIN_STEPS: gl.constexpr, MAX_PIECES: gl.constexpr,
    BP: gl.constexpr, COMBINE: gl.constexpr, START: gl.constexpr, WINDOW: gl.constexpr, mma: gl.constexpr,
    lay_k3: gl.constexpr, lay_v3: gl.constexpr, lay_vw: gl.constexpr, lay_q: gl.constexpr, lay_b: gl.constexpr,
    lay_o: gl.constexpr, lay_s: gl.constexpr, sh_k: gl.constexpr,
    sh_v: gl.constexpr, sh_p: gl.constexpr,
):
    HKV: gl.constexpr = HQ // G
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

    # The work of a KV head is its (request) pairs' steps in batch order, cut into equal runs, one per
    # program; a run may start or end inside a pair and span several. Every head is cut the same way and
    # program r HKV + kh runs run r of head kh, so the warps of a request's heads start together and read
    # its pages at the same time, as the DRAM likes (heads apart in time cost 10 % and more). The cut
    # gives each run >= MIN_STEPS steps and each pair <= MAX_PIECES pieces (the reduce reads them all).
    i_b = gl.arange(0, BP, layout=lay_b)
    lens = gl.load(len_ptr + i_b, mask=i_b < B, other=0)
    steps = gl.where(i_b < B, gl.maximum(gl.cdiv(lens, STEP), 1), 0)  # every request has a step
    ends = gl.associative_scan(steps, 0, _add)  # the step after each request
    per_head = gl.sum(steps, 0)
    chunk = gl.maximum(gl.cdiv(gl.max(steps, 0), MAX_PIECES - 1), MIN_STEPS)
    runs = gl.maximum(gl.minimum(gl.num_programs(0) // HKV, per_head // chunk), 1)  # per head
    size = per_head // runs
    extra = per_head - size * runs  # runs 0 .. extra - 1 take one step more
    kh = gl.program_id(0) % HKV
    r = gl.minimum(gl.program_id(0) // HKV, runs - 1)
    o = r * size + gl.minimum(r, extra)  # the run's first step, and its end
    o_end = gl.where(gl.program_id(0) < runs * HKV, o + size + (r < extra).to(gl.int32), o)  # left over: idle
    before = ends <= o
    b = gl.sum(before.to(gl.int32), 0)
    n0 = (o - gl.max(gl.where(before, ends, 0), 0)) * STEP
    n = gl.sum(gl.where(i_b == b, lens, 0), 0)

    # each layout's tokens of a step, and their rows' offsets from the step's first row (loop-invariant)
    tk = gl.arange(0, STEP, layout=gl.SliceLayout(1, lay_kw))
    tv = gl.arange(0, STEP, layout=gl.SliceLayout(1, lay_vw))
    tp = gl.arange(0, STEP, layout=gl.SliceLayout(1, mma))  # also the rows of S^T
    HALF: gl.constexpr = 16  # one mma M tile (decode_int4_warp.HALF): each lies in one page
    k_off = ((tk % HALF) * S_KCS + kh * S_KCH)[:, None] + gl.arange(0, W, layout=gl.SliceLayout(0, lay_kw))[None, :]
    v_off = ((tv % HALF) * S_VCS + kh * S_VCH)[:, None] + gl.arange(0, W, layout=gl.SliceLayout(0, lay_vw))[None, :]
    p_off = (tp % HALF) * S_PS + kh * S_PH

    # Software pipeline over the run's steps, whichever pairs they belong to: the codes and (scale, lo)
    # words of steps i + 1 .. i + STAGES - 1 are in flight (cp.async into shared buffers, which costs no
    # registers) while step i computes; the page of step i + STAGES is looked up. Cursors (request, first
    # token, request length) walk ahead: step i + STAGES - 1 is (page1, m1, n1) and step i + STAGES is
    # (b2, m2, n2). The page is carried as loaded and turned into a slot only when used: computing the slot
    # right after the load waits for the page table every step (8 us more at 64 x 4k on the H100). Each
    # thread reads back only the words it copied, so no barrier is needed (the compiler still places
    # one per step).
    k_smem = gl.allocate_shared_memory(gl.int32, [STAGES, STEP, W], sh_k)
    v_smem = gl.allocate_shared_memory(gl.int32, [STAGES, STEP, W], sh_v)
    kp_smem = gl.allocate_shared_memory(gl.int32, [STAGES, STEP], sh_p)
    vp_smem = gl.allocate_shared_memory(gl.int32, [STAGES, STEP], sh_p)
    b1, m1, n1 = b, n0, n
    for ahead in gl.static_range(STAGES - 1):
        page1a, page1b = _pages(pt_ptr, b1, m1, n1, o + ahead < o_end, s_ptb, PAGE, STEP, HALF)
        buf = (o + ahead) % STAGES
        _copy_step(k_smem.index(buf), v_smem.index(buf), kp_smem.index(buf), vp_smem.index(buf), kc_ptr, vc_ptr,
                   kp_ptr, vp_ptr, page1a, page1b, m1, n1, k_off, v_off, tk, tv, tp, p_off, S_KCS, S_VCS, S_PS, PAGE,
                   STEP, HALF)
        b1, m1, n1 = _next_step(b1, m1, n1, len_ptr, B, STEP)
    page1a, page1b = _pages(pt_ptr, b1, m1, n1, o + STAGES - 1 < o_end, s_ptb, PAGE, STEP, HALF)
    b2, m2, n2 = _next_step(b1, m1, n1, len_ptr, B, STEP)

    while o < o_end:
        # one piece: the steps of pair (b, kh) from token n0 that this run holds
        pair_steps = gl.maximum(gl.cdiv(n, STEP), 1)
        seg = gl.minimum(pair_steps - n0 // STEP, o_end - o)
        qt_lo, qt_hi, inv_r, q_off, q_sum = _query_operands(q_ptr, b, kh, s_qb, s_qh, qk_scale, G, GP, D2, mma,
                                                            lay_q)
        first_tok = 0  # with START, the pair's tokens below start_ptr[b] (its bf16 sinks) are not read here
        if START:
            first_tok = gl.load(start_ptr + b)
        m_i = gl.full([GP], float("-inf"), gl.float32, layout=gl.SliceLayout(0, mma))
        l_rows = gl.zeros([STEP, GP], gl.float32, layout=mma)  # sum p, sum fp16(p s_v), sum p lo_v per row
        ps_rows = gl.zeros([STEP, GP], gl.float32, layout=mma)
        plo_rows = gl.zeros([STEP, GP], gl.float32, layout=mma)
        acc_lo = gl.zeros([D2, GP], gl.float32, layout=mma)  # o^T halves, rows in V's logical order
        acc_hi = gl.zeros([D2, GP], gl.float32, layout=mma)
        for j in range(seg):
            i = o + j
            m0 = n0 + j * STEP
            page2a, page2b = _pages(pt_ptr, b2, m2, n2, i + STAGES < o_end, s_ptb, PAGE, STEP, HALF)
            buf = (i + STAGES - 1) % STAGES
            _copy_step(k_smem.index(buf), v_smem.index(buf), kp_smem.index(buf), vp_smem.index(buf), kc_ptr, vc_ptr,
                       kp_ptr, vp_ptr, page1a, page1b, m1, n1, k_off, v_off, tk, tv, tp, p_off, S_KCS, S_VCS, S_PS,
                       PAGE, STEP, HALF)
            page1a, page1b, m1, n1 = page2a, page2b, m2, n2
            b2, m2, n2 = _next_step(b2, m2, n2, len_ptr, B, STEP)
            async_copy.wait_group(STAGES - 1)  # step i's group has landed
            buf = i % STAGES
            k_codes = k_smem.index(buf).load(lay_kw)
            v_codes = v_smem.index(buf).load(lay_vw)
            kw = kp_smem.index(buf).load(gl.SliceLayout(1, mma))
            vw = vp_smem.index(buf).load(gl.SliceLayout(1, mma))
            k_lo, k_hi = _codes_f16(k_codes, lay_k3, False)
            qc = mma_v2(_k_operand(k_lo, STEP, KCH, dot_a), qt_lo, gl.zeros([STEP, GP], gl.float32, layout=mma))
            qc = mma_v2(_k_operand(k_hi, STEP, KCH, dot_a), qt_hi, qc)  # r (q . c) + 1024 sum(fp16 q)
            k_s = _half(kw, False) * qk_scale
            k_m = _half(kw, True)
            s = k_s[:, None] * (qc * inv_r[None, :] + q_off[None, :]) + k_m[:, None] * q_sum[None, :]
            s = gl.where(((tp < n - m0) & (tp >= first_tok - m0))[:, None], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 0))
            if gl.max(m_new - m_i, 0) > LAZY:  # rescale only when a max grew by more than LAZY (log2)
                alpha = gl.exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))
                acc_lo = acc_lo * alpha[None, :]
                acc_hi = acc_hi * alpha[None, :]
                l_rows = l_rows * alpha[None, :]
                ps_rows = ps_rows * alpha[None, :]
                plo_rows = plo_rows * alpha[None, :]
                m_i = m_new
            pr = gl.exp2(s - gl.where(m_i == float("-inf"), 0.0, m_i)[None, :])
            pw = (pr * _half(vw, False)[:, None]).to(gl.float16)
            pt = gl.convert_layout(pw, dot_b)
            v_words = gl.convert_layout(v_codes, gl.SliceLayout(2, lay_v3), assert_trivial=True)  # register order
            v_lo, v_hi = _codes_f16(v_words, lay_v3, True)
            acc_lo = mma_v2(_v_operand(v_lo, STEP, KCH, dot_a), pt, acc_lo)
            acc_hi = mma_v2(_v_operand(v_hi, STEP, KCH, dot_a), pt, acc_hi)
            l_rows += pr
            ps_rows += pw.to(gl.float32)
            plo_rows += pr * _half(vw, True)[:, None]

        # the piece's partial (o in byte order, lse in the log2 domain) at rows (kh (runs + B) + r + b) G +
        # query: r + b grows along a head's work and stays below runs + B, so pieces never share rows
        l_i = gl.sum(l_rows, 0)
        ps = gl.sum(ps_rows, 0)
        plo = gl.sum(plo_rows, 0)
        l_safe = gl.where(l_i > 0, l_i, 1.0)
        o_lo = (acc_lo - OFF * ps[None, :] + plo[None, :]) / l_safe[None, :]
        o_hi = ((acc_hi - OFF * ps[None, :]) * 0.0625 + plo[None, :]) / l_safe[None, :]
        lr = gl.arange(0, D2, layout=gl.SliceLayout(1, mma))
        vphys = BV * (lr % 8) + 2 * (lr // 16) + (lr // 8) % 2
        qn = gl.arange(0, GP, layout=gl.SliceLayout(0, mma))
        qm = qn < G
        block = kh * (runs + B) + b
        row = (block + r).to(gl.int64) * G + qn
        o_ptr = po_ptr + row[None, :] * D + vphys[:, None]
        gl.store(o_ptr, o_lo, mask=qm[None, :])
        gl.store(o_ptr + D2, o_hi, mask=qm[None, :])
        gl.store(pl_ptr + row, m_i + gl.log2(l_safe) + gl.where(l_i > 0, 0.0, float("-inf")), mask=qm)
        first = o - n0 // STEP  # the pair's first step
        first_r = _run_of(first, size, extra)
        pair = b * HKV + kh
        if COMBINE:
            # the piece that lands last combines the pair's pieces into out (and resets its count)
            pieces = _run_of(first + pair_steps - 1, size, extra) - first_r + 1
            gl.thread_barrier()  # every lane's stores precede the count
            landed = 1
            if pieces > 1:
                landed = gl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel", scope="gpu") + 1
            if landed == pieces:
                _combine_pieces(po_ptr, pl_ptr, wo_ptr, wl_ptr, out_ptr, block + first_r, pieces, b, kh, s_ob, s_oh,
                                HQ, G, GP, D, MAX_PIECES, WINDOW, lay_o, lay_s)
                if pieces > 1:
                    gl.store(cnt_ptr + pair, 0)
        else:
            # the run holding the pair's last step records its pieces for _reduce_kernel: (first row block,
            # count), from the run holding the pair's first step
            ends_pair = n0 // STEP + seg == pair_steps
            gl.store(meta_ptr + 2 * pair, block + first_r, mask=ends_pair)
            gl.store(meta_ptr + 2 * pair + 1, r - first_r + 1, mask=ends_pair)
        o += seg
        b, n0, n = _next_step(b, n0 + (seg - 1) * STEP, n, len_ptr, B, STEP)


@functools.cache  # built once per shape, not at every (eager) launch
def warp_layouts(step: int, head_dim: int, batch_pad: int) -> dict[str, gl.constexpr]:
    """The kernel's register and shared layouts (one warp) for STEP tokens per step, head_dim, and the
    request lengths padded to batch_pad (a power of two >= 32).

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
        lay_b=gl.BlockedLayout([batch_pad // 32], [32], [1], [0]),  # request lengths
        # combining a pair's pieces: o^T [D, GP], D / 32 consecutive dims per lane; lse [MAX_PIECES, GP]
        lay_o=gl.BlockedLayout([head_dim // 32, 1], [32, 1], [1, 1], [0, 1]),
        lay_s=gl.BlockedLayout([1, 1], [32, 1], [1, 1], [1, 0]),
        # shared buffers [stages, step, words]: K row-major; V in its registers' order (a lane's words, then
        # the lanes, then its tokens), so that every lane's 8-byte accesses fall in distinct banks
        sh_k=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
        sh_v=gl.SharedLinearLayout(
            offset_bases=[[0, w] for w in word_bits] + [[2, 0], [4, 0]] + [[0, wv << i] for i in range(3)]
            + [[1, 0]] + [[t, 0] for t in token_bits]),
        sh_p=gl.SwizzledSharedLayout(1, 1, 1, [0]),  # (scale, lo) words [stages, step]
    )


HALF = 16  # tokens of one mma M tile; pages must hold whole ones
STAGES = 2  # shared buffers of the copy pipeline: STAGES - 1 steps in flight while one computes
# Warps of the compiled kernel an SM holds, from its registers (recorded at each launch, per device,
# head_dim, query rows and register cap): on sm_90 with triton 3.6, 2 per scheduler for 32-token steps.
_RESIDENT: dict[tuple[int | None, int, int, int | None], int] = {}
# A run of fewer tokens costs more than it saves: 64 splits of one 16-token step at batch 1 x 1k took 22 us,
# the reduce summing 64 partials per query (9.9 us for the tile kernel); pieces bound the reduce's loop.
MIN_RUN_TOKENS = 128


def warp_step(group_rows: int) -> int:
    """Tokens per step for query groups padded to group_rows: two mma M tiles (32 tokens) up to 8 rows. Two
    tiles take 17 % fewer instructions per token than one and run two mma chains side by side; ptxas gives
    them ~240 registers (2 warps per scheduler), and that beat every register cap at 16 and 32 tokens on the
    H200 (2026-12-03: 32 tokens capped at 168 registers, 3 warps per scheduler, was 4-15 % slower). With 16
    query rows the loop spills even at one tile, which it keeps."""
    return 2 * HALF if group_rows <= 8 else HALF


MAX_PIECES = 64


MAX_BATCH = 1024  # each program holds the batch's lengths in registers


def warp_kernel_fits(page_size: int, head_dim: int, group: int, batch: int) -> bool:
    """Shapes this kernel serves (others run decode_int4.py)."""
    return page_size % HALF == 0 and head_dim in (64, 128) and group <= 16 and batch <= MAX_BATCH


def warp_programs(device: torch.device, batch: int, num_kv_heads: int, max_context: int, head_dim: int,
                  group_rows: int, maxnreg: int | None = None) -> int:
    """Programs (warps) of a launch, whole groups of the KV heads: one per warp slot of the GPU, all
    resident at once so that equal runs of steps end together, but no more than max_context lets the
    kernel use (idle ones cost launch time: 2 us at batch 1 x 1k). The slots are known from the compiled
    kernel's registers; before its first launch on a device, 12 per SM are assumed."""
    slots = num_sms(device) * _RESIDENT.get((device.index, head_dim, group_rows, maxnreg), 12)
    step = warp_step(group_rows)
    steps = math.ceil(max_context / step)
    runs = batch * steps // max(MIN_RUN_TOKENS // step, math.ceil(steps / (MAX_PIECES - 1)))  # as the kernel cuts
    return max(1, min(slots // num_kv_heads, runs)) * num_kv_heads


def warp_workspace(bsz: int, hq: int, group: int, head_dim: int, programs: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Piece partials o [(programs + pairs) G, D] fp32 and lse [(programs + pairs) G], and per (request, KV
    head) pair (first row block, count) int32: a run adds one piece per pair it touches."""
    rows = (programs + bsz * hq // group) * group
    return (torch.empty(rows, head_dim, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            torch.empty(bsz * hq // group, 2, dtype=torch.int32, device=device))


MAX_KV_HEADS = 128
# Pieces landed per (request, KV head) pair, per device: zero between launches (the last piece of a pair
# resets its count), allocated once and never freed, as captured CUDA graphs hold its address. Launches
# on one device must be ordered (one stream), as the engine's are.
_COUNTERS: dict[int | None, torch.Tensor] = {}


def pair_counters(device: torch.device) -> torch.Tensor:
    counters = _COUNTERS.get(device.index)
    if counters is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode_attention: run it once on this device before capturing a CUDA graph")
        counters = _COUNTERS[device.index] = torch.zeros(MAX_BATCH * MAX_KV_HEADS, dtype=torch.int32, device=device)
    return counters


def launch_warp_decode(q: torch.Tensor, cache: LayerCache, page_table: torch.Tensor, seq_lens: torch.Tensor,
                       qk_scale: float, out: torch.Tensor, combine: bool, programs: int, group_rows: int,
                       maxnreg: int | None = None, starts: torch.Tensor | None = None,
                       window: tuple[torch.Tensor, torch.Tensor] | None = None, stages: int = STAGES
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, D] (plain, or already rotated) over cache's uint8 pages [slots, Hkv, D/2] (read as
    int32 words) and (scale, lo) words, from `programs` warps, request b over tokens [starts[b], seq_lens[b])
    (from 0 without starts). With combine, each pair's last piece writes out, merging window's partial (o
    [B, Hq, D] fp32, lse [B, Hq]) if given; otherwise the pieces are left in the returned workspace
    (warp_workspace) for _reduce_kernel."""
    bsz, hq, d = q.shape
    hkv = cache.k.shape[1]
    assert hkv <= MAX_KV_HEADS
    kw, vw = cache.k.view(torch.int32), cache.v.view(torch.int32)
    kp, vp, s_ps, s_ph = cache_args(cache)[:4]
    po, pl, meta = workspace = warp_workspace(bsz, hq, hq // hkv, d, programs, q.device)
    batch_pad = max(32, 1 << (bsz - 1).bit_length())
    step = warp_step(group_rows)
    compiled = decode_int4_warp_kernel[(programs,)](
        q, kw, vw, kp, vp, page_table, seq_lens, seq_lens if starts is None else starts, po, pl, meta,
        pair_counters(q.device), *(window or (out, out)), out, bsz, q.stride(0),
        q.stride(1), page_table.stride(0), out.stride(0), out.stride(1), qk_scale, S_KCS=kw.stride(0),
        S_KCH=kw.stride(1), S_VCS=vw.stride(0), S_VCH=vw.stride(1), S_PS=s_ps, S_PH=s_ph, HQ=hq, G=hq // hkv,
        GP=group_rows, D=d, PAGE=cache.page_size, STEP=step, STAGES=stages, MIN_STEPS=MIN_RUN_TOKENS // step,
        MAX_PIECES=MAX_PIECES, BP=batch_pad, COMBINE=combine, START=starts is not None, WINDOW=window is not None,
        **warp_layouts(step, d, batch_pad), num_warps=1, maxnreg=maxnreg)
    # each of an SM's 4 schedulers has 16k registers, given out in units of 256 per warp
    regs_per_warp = math.ceil(compiled.n_regs * 32 / 256) * 256
    _RESIDENT[(q.device.index, d, group_rows, maxnreg)] = min(32, 4 * (16384 // regs_per_warp))
    return workspace
