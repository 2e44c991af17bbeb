"""Shared pieces of the Triton kernels: the Hadamard block matrix, in-register rotation, rounding.

Rotation: R = I_(D/b) kron H_b/sqrt(b) is applied to a row split in two halves (lo = first D/2,
hi = last D/2), the same halves the INT4 nibble packing uses. With M = I kron H_min(b, D/2)
(entries 0/+-1, exact in bf16):
  b <  D:  R x = (x_lo M, x_hi M) / sqrt(b)
  b == D:  H_D = [[H, H], [H, -H]]  =>  R x = (x_lo M + x_hi M, x_lo M - x_hi M) / sqrt(b)
so every order costs two [rows, D/2] x [D/2, D/2] tensor-core products with exact products and
fp32 accumulation. An fp32 input is split into bf16 pieces (x = x1 + x2 + x3) so that it is
rotated to about fp32 accuracy.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from saw_kv.cache import LayerCache

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter multiplies bf16 operands as their raw uint16 bits (triton 3.9): upcast there.
_INTERP = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634
EPS = tl.constexpr(1e-5)  # formats.EPS, as a constexpr so kernels may read it

_H_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def half_hadamard(head_dim: int, order: int, device: torch.device) -> torch.Tensor:
    """M = I kron H_min(order, D/2), unnormalized, bf16 [D/2, D/2] (cached per device)."""
    key = (head_dim, order, str(device))
    m = _H_CACHE.get(key)
    if m is None:
        half = head_dim // 2
        b = min(order, half)
        h = torch.ones(1, 1)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        m = torch.block_diag(*([h] * (half // b))).to(device=device, dtype=torch.bfloat16).contiguous()
        _H_CACHE[key] = m
    return m


def rotation_args(fmt_order: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, bool, float]:
    """(M, FULL, 1/sqrt(b)) for a kernel that rotates."""
    return half_hadamard(head_dim, fmt_order, device), fmt_order == head_dim, 1.0 / math.sqrt(fmt_order)


class CacheArgs(NamedTuple):
    """What every cache kernel takes for a layer's cache, derived once per LayerCache object (cache_args)."""

    kp: torch.Tensor  # (scale, lo) fp16 pairs viewed as int32 [slots, Hkv]; the K pages stand in for bf16
    vp: torch.Tensor
    s_ps: int  # their (slot, head) strides, shared by K and V (0 for bf16)
    s_ph: int
    hmat: torch.Tensor  # rotation: M (half_hadamard), FULL, 1/sqrt(b); the K pages, False, 1.0 unrotated
    full: bool
    inv: float


def params_as_words(k_params: torch.Tensor | None, v_params: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """fp16 (scale, lo) [slots, Hkv, 2] viewed as int32 [slots, Hkv]: one 4-byte access per row."""
    assert k_params is not None and v_params is not None and k_params.stride() == v_params.stride()
    assert k_params.stride(-1) == 1 and k_params.stride(1) == 2
    kw, vw = k_params.view(torch.int32).squeeze(-1), v_params.view(torch.int32).squeeze(-1)
    return kw, vw, kw.stride(0), kw.stride(1)


_CACHE_ARGS: weakref.WeakKeyDictionary[LayerCache, CacheArgs] = weakref.WeakKeyDictionary()


def cache_args(cache: LayerCache) -> CacheArgs:
    """The (scale, lo) words and their strides, then the rotation arguments (M, FULL, 1/sqrt(b)) of cache's
    format, built at the first call for this cache object (LayerCache is frozen) and reused after."""
    args = _CACHE_ARGS.get(cache)
    if args is None:
        fmt, k_cache = cache.fmt, cache.k
        assert k_cache.stride(-1) == 1 and cache.v.stride(-1) == 1
        if fmt.quantized:
            kp, vp, s_ps, s_ph = params_as_words(cache.k_params, cache.v_params)
        else:
            kp = vp = k_cache
            s_ps = s_ph = 0
        if fmt.rotated:
            hmat, full, inv = rotation_args(fmt.hadamard_order, fmt.head_dim, k_cache.device)
        else:
            hmat, full, inv = k_cache, False, 1.0
        args = _CACHE_ARGS[cache] = CacheArgs(kp, vp, s_ps, s_ph, hmat, full, inv)
    return args


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton.jit
def mma(a, b, acc=None):
    """tl.dot with fp32 accumulation; bf16 operands on the GPU, fp32 copies of them under the interpreter."""
    if _INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if acc is None:
        return tl.dot(a, b, out_dtype=tl.float32)
    return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _dot_split(x, m, NSPLIT: tl.constexpr, acc=None):
    """acc + x (fp32 [R, D2]) @ m (bf16 [D2, D2]) with x split into NSPLIT bf16 pieces."""
    p = x.to(tl.bfloat16)
    acc = mma(p, m, acc)
    if NSPLIT >= 2:
        r = x - p.to(tl.float32)
        p2 = r.to(tl.bfloat16)
        acc = mma(p2, m, acc)
        if NSPLIT >= 3:
            r3 = r - p2.to(tl.float32)
            acc = mma(r3.to(tl.bfloat16), m, acc)
    return acc


@triton.jit
def rotate_halves(x_lo, x_hi, m, inv_sqrt_b, FULL: tl.constexpr, NSPLIT: tl.constexpr, a0=None, b0=None):
    """R x for rows given as halves (fp32 [R, D/2] each); returns the rotated halves in fp32.

    a0, b0 (fp32 [R, D/2], mma layout): start values of the products x_lo M, x_hi M (R (x - mu) with
    a0 = -mu_lo M, b0 = -mu_hi M, for every order)."""
    a = _dot_split(x_lo, m, NSPLIT, a0)
    b = _dot_split(x_hi, m, NSPLIT, b0)
    if FULL:
        return (a + b) * inv_sqrt_b, (a - b) * inv_sqrt_b
    return a * inv_sqrt_b, b * inv_sqrt_b


@triton.jit
def load_hmat(h_ptr, D2: tl.constexpr):
    c = tl.arange(0, D2)
    return tl.load(h_ptr + c[:, None] * D2 + c[None, :])


@triton.jit
def split_bounds(len_ptr, b, sp, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of request b's cached tokens that split sp covers (whole BLOCK_N tiles per split)."""
    seq_len = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    start = sp * chunk
    return start, tl.minimum(start + chunk, seq_len)


@triton.jit
def page_slots(pt_row, pos, nm, PAGE: tl.constexpr):
    """Cache slots of token positions pos (masked by nm) through one request's page-table row."""
    page = tl.load(pt_row + pos // PAGE, mask=nm, other=0).to(tl.int64)
    return page * PAGE + pos % PAGE


@triton.jit
def store_halves(ptr, row_off, c, x_lo, x_hi, rm, D2: tl.constexpr):
    """Rows given as halves (first and last D/2) to ptr + row_off, rows masked by rm."""
    tl.store(ptr + row_off[:, None] + c[None, :], x_lo, mask=rm[:, None])
    tl.store(ptr + row_off[:, None] + D2 + c[None, :], x_hi, mask=rm[:, None])


@triton.jit
def store_split_result(o_lo, o_hi, m_i, l_i, b, sp, qh, gm, c, out_ptr, po_ptr, pl_ptr, s_ob, s_oh,
                       HQ: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, FINAL: tl.constexpr):
    """A decode program's normalized o: the bf16 output if FINAL (one split, nothing else to merge), else
    the split's partial o [B, Hq, SPLITS, D] fp32 and lse [B, Hq, SPLITS] (log2 domain) that the reduce
    kernel combines."""
    if FINAL:
        store_halves(out_ptr, b.to(tl.int64) * s_ob + qh * s_oh, c, o_lo.to(tl.bfloat16), o_hi.to(tl.bfloat16),
                     gm, D // 2)
    else:
        row = (b.to(tl.int64) * HQ + qh) * SPLITS + sp
        store_halves(po_ptr, row * D, c, o_lo, o_hi, gm, D // 2)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(pl_ptr + row, m_i + tl.log2(l_safe) + tl.where(l_i > 0, 0.0, float("-inf")), mask=gm)


@triton.jit
def load_query_group(q_ptr, b, kh, s_qb, s_qh, G: tl.constexpr, GP: tl.constexpr, D2: tl.constexpr):
    """Request b's queries of KV head kh's group, padded to GP rows: (head ids, row mask, the column
    range of a half, bf16 halves [GP, D/2])."""
    g = tl.arange(0, GP)
    gm = g < G
    qh = kh * G + g
    c = tl.arange(0, D2)
    q_off = b.to(tl.int64) * s_qb + qh * s_qh
    q_lo = tl.load(q_ptr + q_off[:, None] + c[None, :], mask=gm[:, None], other=0.0)
    q_hi = tl.load(q_ptr + q_off[:, None] + D2 + c[None, :], mask=gm[:, None], other=0.0)
    return qh, gm, c, q_lo, q_hi
