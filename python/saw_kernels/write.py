"""Fused paged KV write: center + rotate + min/max + INT4 quantize + pack + scatter, K and V in one launch.

For int4-bdr decode steps the same launch also rotates the step's queries (write_kv(q=...)), in
programs of their own: the decode kernel then reads R q instead of rotating q once per split.

(scale, lo) match formats.quantize_int4 bit for bit on unrotated rows (same fp32 ops, IEEE
division). Codes use (x - lo) * (1/scale) instead of a division per element (the division's slow
path cost ~9 instructions per element in a kernel that must run at copy bandwidth): the two differ
by at most ~2 ulp, so a code can differ by one only where (x - lo) / scale lies within ~2e-6 of a
.5 tie. Rotated rows are also summed in a different order than the torch reference (tensor-core
products, K's mean among them) and scaled by 1/sqrt(b) per row (_quant_store), so there a code can
differ by one where the quotient lies within ~1e-5 of a tie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from saw_kernels._common import (
    EPS,
    INTERPRET,
    cache_args,
    half_hadamard,
    load_hmat,
    mma,
    rotate_halves,
    store_halves,
)
from saw_kv.cache import LayerCache


@triton.jit
def _codes(x, m, r):
    """clamp(round_half_even((x - m) * r), 0, 15) in the low 4 bits of fp32 bits (the rest is C's).

    Adding C = 1.5 * 2**23 rounds to an integer held in the low mantissa bits (half to even, like
    rint); clamping C + q to [C, C + 15] in float leaves the code in bits 0-3 of 0x4B4000xx, so no
    integer subtraction or clamp is needed and a pair packs with one shift-add (see _quant_store).
    """
    c: tl.constexpr = 12582912.0
    return tl.minimum(tl.maximum((x - m) * r + c, c), c + 15.0).to(tl.int32, bitcast=True)


@triton.jit
def _quant_store(y_lo, y_hi, UNIT: tl.constexpr, data_ptr, par_ptr, row_off, par_off, c, ok):
    """Quantize rows x = UNIT * y (y: fp32 halves [R, D/2]) to INT4 and store packed bytes + fp16 (scale, lo).

    A rotation's 1/sqrt(b) is applied per row, not per element: min(UNIT * y) = UNIT * min(y) exactly
    (rounding is monotonic), and the codes take (y - m / UNIT) * (r * UNIT), which differs from
    (x - m) * r by a few ulp (rotated rows only, where the sums' order already differs; UNIT = 1 else).
    """
    lo = tl.minimum(tl.min(y_lo, 1), tl.min(y_hi, 1)) * UNIT
    hi = tl.maximum(tl.max(y_lo, 1), tl.max(y_hi, 1)) * UNIT
    scale = tl.math.div_rn(tl.maximum(hi - lo, EPS), 15.0)
    s16 = scale.to(tl.float16)
    m16 = lo.to(tl.float16)
    # one IEEE reciprocal per row instead of a division per element (see the module docstring)
    r = (tl.math.div_rn(1.0, s16.to(tl.float32)) * UNIT)[:, None]
    m = (m16.to(tl.float32) * (1.0 / UNIT))[:, None]
    # low byte: lo code + (hi code << 4) (C's bits end above bit 7 once shifted; no carry out of the byte)
    packed = (_codes(y_lo, m, r) + (_codes(y_hi, m, r) << 4)).to(tl.uint8)
    tl.store(data_ptr + row_off[:, None] + c[None, :], packed, mask=ok[:, None])
    word = s16.to(tl.uint16, bitcast=True).to(tl.int32) | (m16.to(tl.uint16, bitcast=True).to(tl.int32) << 16)
    tl.store(par_ptr + par_off, word, mask=ok)  # (scale, lo) as one 4-byte store


@triton.jit
def _minus_mean_products(p_ptr, h, HKV: tl.constexpr, D2: tl.constexpr, KP: tl.constexpr):
    """-mu_lo M, -mu_hi M for rows of heads h, in the mma layout the rotation accumulates in.

    A one-hot [R, KP] row selector times the bf16 pieces of -mu M (mean_pieces: row piece * HKV + head)
    is exact, so the mean needs no layout conversion (H100, T = 8192: subtracting an fp32 R mu loaded
    per element after the rotation took 29.3 us against 18.4 without centering: two fp32 conversions
    of the tile, one for the subtraction in the mma layout and one back, and 220 registers).
    """
    j = tl.arange(0, KP)
    c = tl.arange(0, D2)
    p_lo = tl.load(p_ptr + j[:, None] * (2 * D2) + c[None, :])
    p_hi = tl.load(p_ptr + j[:, None] * (2 * D2) + D2 + c[None, :])
    e = tl.where(j[None, :] % HKV == h[:, None], 1.0, 0.0).to(tl.bfloat16)  # bool -> bf16 is 0 in the interpreter
    return mma(e, p_lo), mma(e, p_hi)


@triton.jit
def _rotate_query_rows(q_ptr, qr_ptr, h_ptr, r0, n_q_rows, s_qt, s_qh, INV_SQRT_B: tl.constexpr,
                       HQ: tl.constexpr, D2: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """R q (fp32, into contiguous qr [T, HQ, D]) for rows r0 .. r0 + BLOCK of q [T, HQ] (bf16: one exact piece)."""
    r = r0 + tl.arange(0, BLOCK)
    rm = r < n_q_rows
    c = tl.arange(0, D2)
    off = (r // HQ).to(tl.int64) * s_qt + (r % HQ) * s_qh
    x_lo = tl.load(q_ptr + off[:, None] + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    x_hi = tl.load(q_ptr + off[:, None] + D2 + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    r_lo, r_hi = rotate_halves(x_lo, x_hi, load_hmat(h_ptr, D2), INV_SQRT_B, FULL, 1)
    store_halves(qr_ptr, r.to(tl.int64) * (2 * D2), c, r_lo, r_hi, rm, D2)


@triton.jit
def _store_rows(x_lo, x_hi, m, mean_ptr, cache_ptr, par_ptr, c_off, p_off, h, c, ok,
                INV_SQRT_B: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr,
                ROT: tl.constexpr, FULL: tl.constexpr, CENTER: tl.constexpr, KP: tl.constexpr):
    """Rows of one of K, V (bf16 halves [R, D/2] as loaded) into its cache: center (K), rotate, quantize."""
    D2: tl.constexpr = D // 2
    if QUANT:
        y_lo = x_lo.to(tl.float32)
        y_hi = x_hi.to(tl.float32)
        if ROT:  # unscaled: _quant_store applies 1/sqrt(b) per row
            if CENTER:  # R (k - mu): the products of the exact bf16 k start from -mu M
                a0, b0 = _minus_mean_products(mean_ptr, h, HKV, D2, KP)
                y_lo, y_hi = rotate_halves(y_lo, y_hi, m, 1.0, FULL, 1, a0, b0)
            else:
                y_lo, y_hi = rotate_halves(y_lo, y_hi, m, 1.0, FULL, 1)
        elif CENTER:
            y_lo = y_lo - tl.load(mean_ptr + h[:, None] * D + c[None, :])
            y_hi = y_hi - tl.load(mean_ptr + h[:, None] * D + D2 + c[None, :])
        _quant_store(y_lo, y_hi, INV_SQRT_B if ROT else 1.0, cache_ptr, par_ptr, c_off, p_off, c, ok)
    else:
        store_halves(cache_ptr, c_off, c, x_lo, x_hi, ok, D2)


@triton.jit
def _write_rows(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr, r0,
    n_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, INV_SQRT_B: tl.constexpr,
    HKV: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr,
    FULL: tl.constexpr, CENTER: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
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
    # K and V are both loaded before anything is stored (a load is not moved above a store that may
    # alias it), so V's loads overlap K's work. K and V in programs of their own would halve the
    # registers but lose that overlap (H100, int4-bdr-b128 + k_center: 18.4 vs 18.0 us at T = 8192,
    # 66.2 vs 63.6 at 32768).
    k_off = t.to(tl.int64) * s_kt + h * s_kh
    v_off = t.to(tl.int64) * s_vt + h * s_vh
    k_lo = tl.load(k_ptr + k_off[:, None] + c[None, :], mask=ok[:, None], other=0.0)
    k_hi = tl.load(k_ptr + k_off[:, None] + D2 + c[None, :], mask=ok[:, None], other=0.0)
    v_lo = tl.load(v_ptr + v_off[:, None] + c[None, :], mask=ok[:, None], other=0.0)
    v_hi = tl.load(v_ptr + v_off[:, None] + D2 + c[None, :], mask=ok[:, None], other=0.0)
    m = None
    if QUANT and (ROT_K or ROT_V):
        m = load_hmat(h_ptr, D2)
    p_off = slot * s_ps + h * s_ph
    _store_rows(k_lo, k_hi, m, mean_ptr, kc_ptr, kp_ptr, slot * s_kcs + h * s_kch, p_off, h, c, ok,
                INV_SQRT_B, HKV, D, QUANT, ROT_K, FULL, CENTER, KP)
    _store_rows(v_lo, v_hi, m, mean_ptr, vc_ptr, vp_ptr, slot * s_vcs + h * s_vch, p_off, h, c, ok,
                INV_SQRT_B, HKV, D, QUANT, ROT_V, FULL, False, KP)


@triton.jit
def _write_kernel(
    k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr, q_ptr, qr_ptr,
    n_rows, n_q_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, s_qt, s_qh,
    INV_SQRT_B: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr,
    ROT_K: tl.constexpr, ROT_V: tl.constexpr, FULL: tl.constexpr, CENTER: tl.constexpr, KP: tl.constexpr,
    ROT_Q: tl.constexpr, BLOCK: tl.constexpr,
):
    # The queries (ROT_Q) get programs of their own after the cache rows' ones: a decode step writes
    # few rows, so this adds parallel work instead of lengthening each program's chain
    # (H100, batch 64: 3.4 us without q; 11.0 us with q rotated inside the write programs).
    pid = tl.program_id(0)
    n_write = tl.cdiv(n_rows, BLOCK)
    if ROT_Q and pid >= n_write:
        _rotate_query_rows(q_ptr, qr_ptr, h_ptr, (pid - n_write) * BLOCK, n_q_rows, s_qt, s_qh, INV_SQRT_B,
                           HQ, D // 2, FULL, BLOCK)
    else:
        _write_rows(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, kp_ptr, vp_ptr, mean_ptr, h_ptr, pid * BLOCK,
                    n_rows, s_kt, s_kh, s_vt, s_vh, s_kcs, s_kch, s_vcs, s_vch, s_ps, s_ph, INV_SQRT_B,
                    HKV, D, QUANT, ROT_K, ROT_V, FULL, CENTER, KP, BLOCK)


_DERIVED: dict[tuple[int, object], tuple[torch.Tensor, int, torch.Tensor]] = {}


def _derived(src: torch.Tensor, key: object, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """build(), a tensor computed from src, cached per src object and version (the entry holds src, so its
    id cannot be reused): an in-place update (calibration) is seen, and refills the tensor built before it,
    which CUDA graphs captured earlier read (SGLang captures before saw's backend calibrates). Inside a graph
    capture a new result would be written only at replay, hence an error there."""
    hit = _DERIVED.get((id(src), key))
    if hit is not None and hit[0] is src and hit[1] == src._version:
        return hit[2]
    if src.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("write_kv: run it once with this k_mean before capturing a CUDA graph")
    x = build()
    if hit is not None and hit[0] is src and hit[2].shape == x.shape:
        x = hit[2].copy_(x)
    if len(_DERIVED) > 4096:  # one per layer in use: a served model never reaches this, so a capture never misses
        _DERIVED.clear()
    _DERIVED[(id(src), key)] = (src, src._version, x)
    return x


def mean_pieces(k_mean: torch.Tensor, order: int) -> torch.Tensor:
    """-(mu_lo M, mu_hi M) (M = half_hadamard) as three bf16 pieces whose sum is that fp32-exact value,
    bf16 [KP, D] with row piece * Hkv + head, zero rows up to KP (a power of two >= 16, a tl.dot K).
    From float64; cached (_derived)."""

    def build() -> torch.Tensor:
        hkv, d = k_mean.shape
        m = half_hadamard(d, order, k_mean.device).double()
        mu = k_mean.double()
        x = -torch.cat([mu[:, : d // 2] @ m, mu[:, d // 2:] @ m], 1)
        pieces = torch.zeros(max(16, triton.next_power_of_2(3 * hkv)), d, dtype=torch.bfloat16,
                             device=k_mean.device)
        for i in range(3):
            pieces[i * hkv: (i + 1) * hkv] = x.to(torch.bfloat16)
            x = x - pieces[i * hkv: (i + 1) * hkv].double()
        return pieces

    return _derived(k_mean, ("mean", order), build)


@dataclass(frozen=True)
class WriteTuning:
    """write_kv's launch configuration: block (rows per program; default 64 for rotated formats and bf16, 32 for
    plain INT4, 16 under the interpreter), num_warps, maxnreg (registers per thread cap; default 128 for rotated
    formats on the GPU, 0 = no cap)."""

    block: int | None = None
    num_warps: int = 4
    maxnreg: int | None = None


DEFAULT_WRITE = WriteTuning()


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache: LayerCache, q: torch.Tensor | None = None,
             *, tuning: WriteTuning = DEFAULT_WRITE) -> torch.Tensor | None:
    """Store K, V [T, Hkv, D] at slots [T] (slot < 0: skipped) in cache (its pages and params, in its format,
    centered by cache.k_mean with fmt.k_center; None: nothing is subtracted).

    With q [T, Hq, D] given and a rotated format, the same launch also returns R q (fp32 [T, Hq, D],
    every row) for decode_attention(q_rotated=True); otherwise it returns q as given (None if not given).
    """
    fmt, k_cache, v_cache, k_mean = cache.fmt, cache.k, cache.v, cache.k_mean
    t, hkv, d = k.shape
    rot_q = q is not None and fmt.rotated
    q_rot = torch.empty(q.shape, dtype=torch.float32, device=q.device) if rot_q else q
    if t == 0:
        return q_rot
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and d == fmt.head_dim
    quant = fmt.quantized
    center = quant and fmt.k_center and k_mean is not None
    params_k, params_v, s_ps, s_ph, hmat, full, inv = cache_args(cache)
    rot = fmt.rotated
    if center:
        mean = mean_pieces(k_mean, fmt.hadamard_order) if rot else k_mean.float().contiguous()
    else:
        mean = k_cache
    if rot_q:
        assert q.shape[0] == t and q.shape[1] % hkv == 0 and q.shape[2] == d and q.stride(-1) == 1
        q_in, q_out, hq, s_qt, s_qh = q, q_rot, q.shape[1], q.stride(0), q.stride(1)
    else:
        q_in, q_out, hq, s_qt, s_qh = k_cache, k_cache, hkv, 0, 0
    block, num_warps, maxnreg = tuning.block, tuning.num_warps, tuning.maxnreg
    slots = slots.contiguous()
    n_rows, n_q_rows = t * hkv, (t * hq if rot_q else 0)
    if block is None:
        # rotated formats: 64 rows, one tensor-core tile (m64) per 4 warps; plain INT4: 32 rows, so that
        # 80 registers let 6 programs share an SM (H100, int4 at T = 8192: 13.7 us, 16.8 with 64 rows)
        block = 16 if INTERPRET else (32 if quant and not rot else 64)
    if maxnreg is None:
        # ~160 registers would leave 3 programs of 4 warps per SM; capped at 128 (8 B of stack), 4 fit
        # (H100, int4-bdr-b128: 17.4 -> 16.7 us at T = 8192, 63.1 -> 60.5 at 32768)
        maxnreg = 128 if rot and not INTERPRET else 0
    grid = (triton.cdiv(n_rows, block) + triton.cdiv(n_q_rows, block),)
    _write_kernel[grid](
        k, v, slots, k_cache, v_cache, params_k, params_v, mean, hmat, q_in, q_out,
        n_rows, n_q_rows, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), s_ps, s_ph, s_qt, s_qh,
        INV_SQRT_B=inv, HKV=hkv, HQ=hq, D=d, QUANT=quant, ROT_K=rot, ROT_V=fmt.rotate_v, FULL=full, CENTER=center,
        KP=mean.shape[0] if center and rot else 16, ROT_Q=rot_q, BLOCK=block, num_warps=num_warps,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return q_rot
