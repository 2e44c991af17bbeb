"""Small fused kernels of a decoder layer: q/k RMSNorm + RoPE straight from the qkv GEMM, SiLU-and-mul, and
residual add + RMSNorm.

Each replaces a chain of elementwise torch kernels (norm, copy, flip, mul, addcmul; silu, mul; add, norm) by
one launch. They compute in fp32, round once to the input dtype, and take their grid from shapes only
(CUDA-graph capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, lam_ptr,
    s_qkv, s_cs, s_pos, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_H: tl.constexpr,
    NORM: tl.constexpr, SCALE: tl.constexpr,
):
    D2: tl.constexpr = D // 2
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # q heads, then k heads
    c = tl.arange(0, BLOCK_D2)
    c_ok = c < D2
    is_q = h < HQ
    ok = (h < HQ + HKV)[:, None] & c_ok[None, :]
    off = t * s_qkv + h[:, None] * D + c[None, :]  # k heads follow the q heads in the fused row
    x_lo = tl.load(qkv_ptr + off, mask=ok, other=0.0).to(tl.float32)
    x_hi = tl.load(qkv_ptr + off + D2, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x_lo * x_lo, 1) + tl.sum(x_hi * x_hi, 1)) / D + eps)[:, None]
        wq_lo = tl.load(qw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        wq_hi = tl.load(qw_ptr + D2 + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        wk_lo = tl.load(kw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        wk_hi = tl.load(kw_ptr + D2 + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        q_row = is_q[:, None]
        x_lo = x_lo * rstd * tl.where(q_row, wq_lo, wk_lo)
        x_hi = x_hi * rstd * tl.where(q_row, wq_hi, wk_hi)
    # cache row: (cos, cos, -sin, sin); rotate-half: (lo cos - hi sin, hi cos + lo sin)
    cs = cs_ptr + tl.load(pos_ptr + t * s_pos).to(tl.int64) * s_cs
    cos = tl.load(cs + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + 3 * D2 + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_lo = x_lo * cos - x_hi * sin
    y_hi = x_hi * cos + x_lo * sin
    if SCALE:  # q heads times lambda of their KV head, k heads divided by their own (exact: powers of two)
        kv = tl.where(is_q, h // (HQ // HKV), h - HQ)
        lam_off = kv[:, None] * D + c[None, :]
        lam_lo = tl.load(lam_ptr + lam_off, mask=ok, other=1.0)
        lam_hi = tl.load(lam_ptr + lam_off + D2, mask=ok, other=1.0)
        q_row = is_q[:, None]
        y_lo = tl.where(q_row, y_lo * lam_lo, y_lo / lam_lo)
        y_hi = tl.where(q_row, y_hi * lam_hi, y_hi / lam_hi)
    q_off = t * (HQ * D) + h[:, None] * D + c[None, :]
    k_off = t * (HKV * D) + (h - HQ)[:, None] * D + c[None, :]
    q_ok = ok & is_q[:, None]
    k_ok = ok & ~is_q[:, None]
    tl.store(q_ptr + q_off, y_lo.to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(q_ptr + q_off + D2, y_hi.to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(k_ptr + k_off, y_lo.to(k_ptr.dtype.element_ty), mask=k_ok)
    tl.store(k_ptr + k_off + D2, y_hi.to(k_ptr.dtype.element_ty), mask=k_ok)


def qk_norm_rope(
    qkv: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2 Hkv) D] (fused projection, q|k|v) -> contiguous q [T, Hq, D], k [T, Hkv, D].

    Per-head RMSNorm (as F.rms_norm: fp32 statistics, fp32 weight multiply; skipped when both weights
    are None), then rotate-half RoPE with cos_sin [max_pos, 2 D] = (cos, cos, -sin, sin) rows
    (rope.cos_sin_cache) at positions [T], then, with k_scale (fp32 [Hkv, D], powers of two), q times
    its KV head's lambda and k divided by it. One launch for all q and k heads; v is not touched."""
    t = qkv.shape[0]
    d = head_dim
    if d % 2 or qkv.dim() != 2 or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * d:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {num_q_heads}+2x{num_kv_heads} heads of {d}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must both be given or both be None")
    if cos_sin.shape[-1] != 2 * d or cos_sin.stride(-1) != 1:
        raise ValueError(f"cos_sin {tuple(cos_sin.shape)} is not a [max_pos, {2 * d}] row-major cache")
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(t, num_q_heads, d, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty(t, num_kv_heads, d, device=qkv.device, dtype=qkv.dtype)
    if t == 0:
        return q, k
    norm = q_norm_weight is not None
    qw = q_norm_weight.contiguous() if norm else qkv  # any pointer: never read without NORM
    kw = k_norm_weight.contiguous() if norm else qkv
    heads = num_q_heads + num_kv_heads
    block_h = min(8, triton.next_power_of_2(heads))
    grid = (t, triton.cdiv(heads, block_h))
    scale = k_scale is not None
    if scale:
        assert k_scale.shape == (num_kv_heads, d) and k_scale.dtype == torch.float32 and k_scale.is_contiguous()
    _qk_norm_rope_kernel[grid](
        qkv, q, k, qw, kw, cos_sin, positions, k_scale if scale else qkv, qkv.stride(0), cos_sin.stride(0),
        positions.stride(0), float(eps),
        HQ=num_q_heads, HKV=num_kv_heads, D=d, BLOCK_D2=triton.next_power_of_2(d // 2), BLOCK_H=block_h,
        NORM=norm, SCALE=scale, num_warps=4 if d >= 128 else 2,
    )
    return q, k


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, s_x, n, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < n
    g = tl.load(x_ptr + t * s_x + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * s_x + n + c, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + t * n + c, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] (gate | up) -> silu(gate) * up [T, I] in gate_up's dtype, computed in fp32."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} is not [T, 2 I]")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, device=gate_up.device, dtype=gate_up.dtype)
    if t == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), n, BLOCK=block,
                                                 num_warps=4 if block >= 512 else 2)
    return out


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, s_x, s_r, n, eps, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < n
    x = tl.load(x_ptr + t * s_x + c, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + t * s_r + c, mask=ok, other=0.0).to(tl.float32)
    # the stream is rounded to its dtype before the norm reads it, as the unfused add would leave it
    s = (x + r).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + t * n + c, s, mask=ok)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, 0) / n + eps)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * n + c, (sf * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] -> (rms_norm(s) * weight, s) with s = x + residual rounded to x's dtype.

    The norm matches F.rms_norm (fp32 statistics and weight multiply, one rounding); s is what
    `x + residual` gives. One launch instead of two, one pass over the row instead of three."""
    if x.dim() != 2 or residual.shape != x.shape or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)}, residual {tuple(residual.shape)}, weight {tuple(weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual.stride(1) != 1:
        residual = residual.contiguous()
    t, n = x.shape
    out = torch.empty(t, n, device=x.device, dtype=x.dtype)
    stream = torch.empty_like(out)
    if t == 0:
        return out, stream
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(t,)](x, residual, weight.contiguous(), out, stream, x.stride(0), residual.stride(0), n,
                               float(eps), BLOCK=block, num_warps=min(8, max(1, block // 512)))
    return out, stream
