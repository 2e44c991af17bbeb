"""Fused paged KV write: center + rotate + min/max + INT4 quantize + pack + scatter, K and V in one launch.

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

from saw_kernels._common import EPS, INTERPRET, load_hmat, rotate_halves
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
def _write_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr,
    n_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph,
    inv_sqrt_b,
    HKV: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr,
    FULL: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr,
):
    D2: tl.constexpr = D // 2
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
             k_mean: torch.Tensor | None = None, block: int | None = None, num_warps: int = 4) -> None:
    """Store K, V [T, Hkv, D] at slots [T] (slot < 0: skipped) in the paged cache of format fmt."""
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    quant = fmt.quantized
    center = quant and fmt.k_center and k_mean is not None
    params_k, params_v, s_ps, s_ph, hmat, full, inv = format_args(fmt, d, k_cache, k_params, v_params)
    rot = fmt.rotated
    if center:
        mean = rotated_mean(k_mean, fmt.hadamard_order) if rot else k_mean.float().contiguous()
    else:
        mean = k_cache
    slots = slots.contiguous()
    n_rows = t * hkv
    if block is None:
        block = 16 if INTERPRET else 64
    grid = (triton.cdiv(n_rows, block),)
    _write_kernel[grid](
        k, v, slots, k_cache, v_cache, params_k, params_v, mean, hmat,
        n_rows, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), s_ps, s_ph,
        inv,
        HKV=hkv, D=d, QUANT=quant, ROT_K=rot, ROT_V=fmt.rotate_v, FULL=full, CENTER=center, BLOCK=block,
        num_warps=num_warps,
    )
