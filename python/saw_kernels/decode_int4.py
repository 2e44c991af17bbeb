"""Paged decode attention over INT4(-BDR) pages, with the cached tokens as the tensor-core M dimension.

One program per (request, KV head, split) serves the head's query group (G <= GP queries). Scores
are computed transposed, S^T [N, GP] = K [N, D] q^T, and the output as o^T [D, GP] = V^T P^T, so
the tile of N cached tokens fills the M = 64/128 rows that Hopper's wgmma wants while the few
queries ride in N = 8/16: nothing is padded per token, and the online softmax works on N x GP
values instead of 16 x N.

INT4 codes are never expanded to values. They become exact fp16 by bits only (one prmt per two
bytes, one lop3 per two codes): 0x6400 | c is 1024 + c, and the high nibble, left in place, is
1024 + 16 c. With scale s and lo per row,
  q . k_hat = s (q . c) + lo sum(q)   and   sum_n p_n v_hat_n = sum_n (p_n s_n) c_n + sum_n p_n lo_n,
and the 1024s come off with the sums of the fp16 q (and fp16 p s) the tensor cores actually saw.
q is scaled per row by a power of two into [2^13, 2^14) before it is rounded to fp16 (11-bit
mantissa; range safe for any q), and p s <= s fits fp16 because s does. Sums over tokens (of p,
p s, p lo) are kept per row and reduced once at the end; only the running max is reduced per tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from saw_kernels._common import (
    _INTERP,
    load_hmat,
    load_query_group,
    mma,
    page_slots,
    rotate_halves,
    split_bounds,
    store_split_result,
)

# Four code bytes ($4) -> fp16 pairs (1024 + low nibbles of bytes 0, 1), (of 2, 3), then the same
# with the high nibbles left in place (1024 + 16 c): one prmt per two bytes, one lop3 per two codes.
CODES_F16_ASM = tl.constexpr("""{
        .reg .b32 t0, t1;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
        }""")


@triton.jit
def _codes_f16(packed):
    """uint8 [N, D2] -> (1024 + low nibble, 1024 + 16 * high nibble) as exact fp16.

    is_pure=False keeps Triton from moving the conversion after the uint8 tile's change into the
    mma operand layout (it would then gather single bytes from shared memory); this way the tile is
    converted as loaded, 16 bytes per thread, and stored once as fp16 for the tensor cores.
    """
    if _INTERP:
        lo = ((packed & 15).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        hi = ((packed & 0xF0).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        lo, hi = tl.inline_asm_elementwise(
            asm=CODES_F16_ASM,
            constraints="=r,=r,=r,=r,r", args=[packed], dtype=(tl.float16, tl.float16), is_pure=False, pack=4)
    return lo, hi


@triton.jit
def _load_rows(c_ptr, p_ptr, slot, h, s_cs, s_ch, s_ps, s_ph, c, nm):
    """Rows at slots [N] of head h: fp16 codes (low half, high half) [N, D2] and fp32 (scale, lo) [N]."""
    packed = tl.load(c_ptr + (slot * s_cs + h * s_ch)[:, None] + c[None, :], mask=nm[:, None], other=0)
    x_lo, x_hi = _codes_f16(packed)
    w = tl.load(p_ptr + slot * s_ps + h * s_ph, mask=nm, other=0)
    scale = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    lo = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return x_lo, x_hi, scale, lo


@triton.jit
def decode_int4_kernel(
    q_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, pt_ptr, len_ptr, start_ptr, h_ptr, out_ptr, po_ptr, pl_ptr,
    s_qb, s_qh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, s_ptb, s_ob, s_oh,
    qk_scale, inv_sqrt_b,
    HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    ROT_Q: tl.constexpr, ROT_V: tl.constexpr, FULL: tl.constexpr, SPLITS: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_N: tl.constexpr, START: tl.constexpr,
):
    # START: request b's tokens below start_ptr[b] (its bf16 sinks) are not read here
    D2: tl.constexpr = D // 2
    OFF: tl.constexpr = 1024.0
    b = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    qh, gm, c, q_lo, q_hi = load_query_group(q_ptr, b, kh, s_qb, s_qh, G, GP, D2)
    q_lo = q_lo.to(tl.float32)
    q_hi = q_hi.to(tl.float32)
    if ROT_Q or ROT_V:
        hm = load_hmat(h_ptr, D2)
    if ROT_Q:
        q_lo, q_hi = rotate_halves(q_lo, q_hi, hm, inv_sqrt_b, FULL, 1)
    q_sum = tl.sum(q_lo, 1) + tl.sum(q_hi, 1)
    amax = tl.maximum(tl.max(tl.abs(q_lo), 1), tl.max(tl.abs(q_hi), 1))
    r = tl.exp2(13.0 - tl.floor(tl.log2(tl.maximum(amax, 1e-30))))
    qf_lo = (q_lo * r[:, None]).to(tl.float16)
    qf_hi = (q_hi * (r * 0.0625)[:, None]).to(tl.float16)  # the high codes carry a factor 16
    q_off1024 = OFF * (tl.sum(qf_lo.to(tl.float32), 1) + tl.sum(qf_hi.to(tl.float32), 1))
    inv_r = 1.0 / r
    qt_lo = tl.trans(qf_lo)
    qt_hi = tl.trans(qf_hi)

    start, end = split_bounds(len_ptr, b, sp, SPLITS, BLOCK_N)
    first = tl.load(start_ptr + b) if START else 0
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_rows = tl.zeros([BLOCK_N, GP], tl.float32)  # sum p, sum fp16(p s_v), sum p lo_v, per tile row
    ps_rows = tl.zeros([BLOCK_N, GP], tl.float32)
    plo_rows = tl.zeros([BLOCK_N, GP], tl.float32)
    acc_lo = tl.zeros([D2, GP], tl.float32)  # o^T, first and second half of D
    acc_hi = tl.zeros([D2, GP], tl.float32)
    pt_row = pt_ptr + b.to(tl.int64) * s_ptb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nm = (pos < end) & (pos >= first)
        slot = page_slots(pt_row, pos, nm, PAGE)
        k_lo, k_hi, k_s, k_m = _load_rows(kc_ptr, kp_ptr, slot, kh, s_kcs, s_kch, s_ps, s_ph, c, nm)
        qc = mma(k_hi, qt_hi, mma(k_lo, qt_lo))  # [N, GP]: r (q . c) + 1024 sum(fp16 q)
        s = (k_s[:, None] * ((qc - q_off1024[None, :]) * inv_r[None, :]) + k_m[:, None] * q_sum[None, :]) * qk_scale
        s = tl.where(nm[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[None, :])
        v_lo, v_hi, v_s, v_m = _load_rows(vc_ptr, vp_ptr, slot, kh, s_vcs, s_vch, s_ps, s_ph, c, nm)
        pw = (p * v_s[:, None]).to(tl.float16)
        acc_lo = mma(tl.trans(v_lo), pw, acc_lo * alpha[None, :])
        acc_hi = mma(tl.trans(v_hi), pw, acc_hi * alpha[None, :])
        l_rows = l_rows * alpha[None, :] + p
        ps_rows = ps_rows * alpha[None, :] + pw.to(tl.float32)
        plo_rows = plo_rows * alpha[None, :] + p * v_m[:, None]
        m_i = m_new
    l_i = tl.sum(l_rows, 0)
    ps = tl.sum(ps_rows, 0)
    plo = tl.sum(plo_rows, 0)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_lo = tl.trans((acc_lo - OFF * ps[None, :] + plo[None, :]) / l_safe[None, :])
    o_hi = tl.trans(((acc_hi - OFF * ps[None, :]) * 0.0625 + plo[None, :]) / l_safe[None, :])
    if FINAL and ROT_V:  # otherwise the reduce rotates the combined output back
        o_lo, o_hi = rotate_halves(o_lo, o_hi, hm, inv_sqrt_b, FULL, 2)
    store_split_result(o_lo, o_hi, m_i, l_i, b, sp, qh, gm, c, out_ptr, po_ptr, pl_ptr, s_ob, s_oh, HQ, D, SPLITS,
                       FINAL)


def query_rows(group: int) -> int:
    """GP: the query group padded to a power of two, at least 8 (the smallest wgmma N)."""
    return max(8, triton.next_power_of_2(group))
