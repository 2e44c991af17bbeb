"""Fused paged KV write: center + rotate + min/max + INT4 quantize + pack + scatter, K and V in one launch.

For int4-bdr decode steps the same launch also rotates the step's queries (write_kv(q=...)), in
programs of their own: the decode kernel then reads R q instead of rotating q once per split.

(scale, lo) match formats.quantize_int4 bit for bit on unrotated rows (same fp32 ops, IEEE
division). Codes use (x - lo) * (1/scale) instead of a division per element (the division's slow
path cost ~9 instructions per element in a kernel that must run at copy bandwidth): the two differ
by at most ~2 ulp, so a code can differ by one only where (x - lo) / scale lies within ~2e-6 of a
.5 tie. Rotated rows are also summed in a different order than the torch reference (tensor-core
products), so there a code can differ by one where the quotient lies within ~1e-5 of a tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from saw_kernels._common import EPS, INTERPRET, load_hmat, rotate_halves, store_halves
from saw_kernels.decode import format_args
from saw_worker.kv.formats import KVFormat, rotate


@triton.jit
def _codes(x, m, r):
    """clamp(round_half_even((x - m) * r), 0, 15) as int32, without int<->float conversions.

    Adding 1.5 * 2**23 rounds to an integer held in the low mantissa bits (half to even, like rint).
    """
    bits = ((x - m) * r + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return tl.minimum(tl.maximum(bits, 0), 15)


@triton.jit
def _quant_store(x_lo, x_hi, data_ptr, par_ptr, row_off, par_off, c, ok):
    """Quantize rows (fp32 halves [R, D/2]) to INT4 and store packed bytes + fp16 (scale, lo)."""
    lo = tl.minimum(tl.min(x_lo, 1), tl.min(x_hi, 1))
    hi = tl.maximum(tl.max(x_lo, 1), tl.max(x_hi, 1))
    scale = tl.math.div_rn(tl.maximum(hi - lo, EPS), 15.0)
    s16 = scale.to(tl.float16)
    m16 = lo.to(tl.float16)
    # one IEEE reciprocal per row instead of a division per element (see the module docstring)
    r = tl.math.div_rn(1.0, s16.to(tl.float32))[:, None]
    m = m16.to(tl.float32)[:, None]
    packed = (_codes(x_lo, m, r) | (_codes(x_hi, m, r) << 4)).to(tl.uint8)
    tl.store(data_ptr + row_off[:, None] + c[None, :], packed, mask=ok[:, None])
    word = s16.to(tl.uint16, bitcast=True).to(tl.int32) | (m16.to(tl.uint16, bitcast=True).to(tl.int32) << 16)
    tl.store(par_ptr + par_off, word, mask=ok)  # (scale, lo) as one 4-byte store


@triton.jit
def _rotate_query_rows(q_ptr, qr_ptr, h_ptr, r0, n_q_rows, s_qt, s_qh, inv_sqrt_b,
                       HQ: tl.constexpr, D2: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """R q (fp32, into contiguous qr [T, HQ, D]) for rows r0 .. r0 + BLOCK of q [T, HQ] (bf16: one exact piece)."""
    r = r0 + tl.arange(0, BLOCK)
    rm = r < n_q_rows
    c = tl.arange(0, D2)
    off = (r // HQ).to(tl.int64) * s_qt + (r % HQ) * s_qh
    x_lo = tl.load(q_ptr + off[:, None] + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    x_hi = tl.load(q_ptr + off[:, None] + D2 + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    r_lo, r_hi = rotate_halves(x_lo, x_hi, load_hmat(h_ptr, D2), inv_sqrt_b, FULL, 1)
    store_halves(qr_ptr, r.to(tl.int64) * (2 * D2), c, r_lo, r_hi, rm, D2)


@triton.jit
def _write_rows(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr, r0,
    n_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, inv_sqrt_b,
    HKV: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr,
    FULL: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr,
):
    """Rows r0 .. r0 + BLOCK of K, V [T, HKV] into the cache."""
    D2: tl.constexpr = D // 2
    rows = r0 + tl.arange(0, BLOCK)
    in_range = rows < n_rows
    t = rows // HKV
    h = rows % HKV
    slot = tl.load(slot_ptr + t, mask=in_range, other=-1).to(tl.int64)
    ok = in_range & (slot >= 0)
    c = tl.arange(0, D2)
    ld = ok[:, None]
    k_off = t.to(tl.int64) * s_kt + h * s_kh
    v_off = t.to(tl.int64) * s_vt + h * s_vh
    k_lo = tl.load(k_ptr + k_off[:, None] + c[None, :], mask=ld, other=0.0)
    k_hi = tl.load(k_ptr + k_off[:, None] + D2 + c[None, :], mask=ld, other=0.0)
    v_lo = tl.load(v_ptr + v_off[:, None] + c[None, :], mask=ld, other=0.0)
    v_hi = tl.load(v_ptr + v_off[:, None] + D2 + c[None, :], mask=ld, other=0.0)
    kc_off = slot * s_kcs + h * s_kch
    vc_off = slot * s_vcs + h * s_vch
    if QUANT:
        xk_lo = k_lo.to(tl.float32)
        xk_hi = k_hi.to(tl.float32)
        if ROT_K or ROT_V:
            m = load_hmat(h_ptr, D2)
        if ROT_K:  # R (k - mu) = R k - R mu: rotate the exact bf16 k, subtract the pre-rotated mean
            xk_lo, xk_hi = rotate_halves(xk_lo, xk_hi, m, inv_sqrt_b, FULL, 1)
        if CENTER:
            xk_lo = xk_lo - tl.load(mean_ptr + h[:, None] * D + c[None, :])
            xk_hi = xk_hi - tl.load(mean_ptr + h[:, None] * D + D2 + c[None, :])
        xv_lo = v_lo.to(tl.float32)
        xv_hi = v_hi.to(tl.float32)
        if ROT_V:
            xv_lo, xv_hi = rotate_halves(xv_lo, xv_hi, m, inv_sqrt_b, FULL, 1)
        p_off = slot * s_ps + h * s_ph
        _quant_store(xk_lo, xk_hi, kc_ptr, kp_ptr, kc_off, p_off, c, ok)
        _quant_store(xv_lo, xv_hi, vc_ptr, vp_ptr, vc_off, p_off, c, ok)
    else:
        tl.store(kc_ptr + kc_off[:, None] + c[None, :], k_lo.to(tl.bfloat16), mask=ld)
        tl.store(kc_ptr + kc_off[:, None] + D2 + c[None, :], k_hi.to(tl.bfloat16), mask=ld)
        tl.store(vc_ptr + vc_off[:, None] + c[None, :], v_lo.to(tl.bfloat16), mask=ld)
        tl.store(vc_ptr + vc_off[:, None] + D2 + c[None, :], v_hi.to(tl.bfloat16), mask=ld)


@triton.jit
def _write_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr, q_ptr, qr_ptr,
    n_rows, n_q_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, s_qt, s_qh,
    inv_sqrt_b,
    HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, ROT_K: tl.constexpr,
    ROT_V: tl.constexpr, FULL: tl.constexpr, CENTER: tl.constexpr, ROT_Q: tl.constexpr, BLOCK: tl.constexpr,
):
    # The queries (ROT_Q) get programs of their own after the cache rows' ones: a decode step writes
    # few rows, so this adds parallel work instead of lengthening each program's chain
    # (H100, batch 64: 3.4 us without q; 11.0 us with q rotated inside the write programs).
    pid = tl.program_id(0)
    n_write = tl.cdiv(n_rows, BLOCK)
    if ROT_Q and pid >= n_write:
        _rotate_query_rows(q_ptr, qr_ptr, h_ptr, (pid - n_write) * BLOCK, n_q_rows, s_qt, s_qh, inv_sqrt_b,
                           HQ, D // 2, FULL, BLOCK)
    else:
        _write_rows(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr, pid * BLOCK,
                    n_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, inv_sqrt_b,
                    HKV, D, QUANT, ROT_K, ROT_V, FULL, CENTER, BLOCK)


_RMEAN: dict[tuple[int, int], tuple[torch.Tensor, int, torch.Tensor]] = {}


def rotated_mean(k_mean: torch.Tensor, order: int) -> torch.Tensor:
    """R mu in fp32 (from float64), cached per k_mean object and version (the entry holds k_mean, so its
    id cannot be reused); recomputed inside a graph capture, where a new result is written only at replay."""
    capturing = k_mean.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (id(k_mean), order)
    hit = _RMEAN.get(key)
    if hit is not None and hit[0] is k_mean and hit[1] == k_mean._version:
        return hit[2]
    if capturing:
        raise RuntimeError("write_kv: run it once with this k_mean before capturing a CUDA graph")
    r = rotate(k_mean.double(), order).float().contiguous()
    if len(_RMEAN) > 64:
        _RMEAN.clear()
    _RMEAN[key] = (k_mean, k_mean._version, r)
    return r


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             k_params: torch.Tensor | None, v_params: torch.Tensor | None, fmt: KVFormat,
             k_mean: torch.Tensor | None = None, q: torch.Tensor | None = None, block: int | None = None,
             num_warps: int = 4) -> torch.Tensor | None:
    """Store K, V [T, Hkv, D] at slots [T] (slot < 0: skipped) in the paged cache of format fmt.

    With q [T, Hq, D] given and a rotated format, the same launch also returns R q (fp32 [T, Hq, D],
    every row) for decode_attention(q_rotated=True); otherwise it returns q as given (None if not given).
    """
    t, hkv, d = k.shape
    rot_q = q is not None and fmt.rotated
    q_rot = torch.empty(q.shape, dtype=torch.float32, device=q.device) if rot_q else q
    if t == 0:
        return q_rot
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    quant = fmt.quantized
    center = quant and fmt.k_center and k_mean is not None
    params_k, params_v, s_ps, s_ph, hmat, full, inv = format_args(fmt, d, k_cache, k_params, v_params)
    rot = fmt.rotated
    if center:
        mean = rotated_mean(k_mean, fmt.hadamard_order) if rot else k_mean.float().contiguous()
    else:
        mean = k_cache
    if rot_q:
        assert q.shape[0] == t and q.shape[1] % hkv == 0 and q.shape[2] == d and q.stride(-1) == 1
        q_in, q_out, hq, s_qt, s_qh = q, q_rot, q.shape[1], q.stride(0), q.stride(1)
    else:
        q_in, q_out, hq, s_qt, s_qh = k_cache, k_cache, hkv, 0, 0
    slots = slots.contiguous()
    n_rows, n_q_rows = t * hkv, (t * hq if rot_q else 0)
    if block is None:
        block = 16 if INTERPRET else 64
    grid = (triton.cdiv(n_rows, block) + triton.cdiv(n_q_rows, block),)
    _write_kernel[grid](
        k, v, slots, k_cache, v_cache, params_k, params_v, mean, hmat, q_in, q_out,
        n_rows, n_q_rows, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), s_ps, s_ph, s_qt, s_qh,
        inv,
        HKV=hkv, HQ=hq, D=d, QUANT=quant, ROT_K=rot, ROT_V=fmt.rotate_v, FULL=full, CENTER=center, ROT_Q=rot_q,
        BLOCK=block, num_warps=num_warps,
    )
    return q_rot
