"""Standalone block-diagonal Hadamard R x = (I kron H_b/sqrt(b)) x along the last dim.

On CUDA it uses Dao-AILab's fast_hadamard_transform when importable, else our Triton kernel;
on CPU it runs the Triton kernel under TRITON_INTERPRET=1 and the torch reference otherwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from saw_kernels._common import INTERPRET, load_hmat, rotate_halves, rotation_args
from saw_kv.formats import rotate

try:  # optional extra: `pip install fast-hadamard-transform`
    from fast_hadamard_transform import hadamard_transform as _fht
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _fht = None

_NSPLIT = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, h_ptr, n_rows, inv_sqrt_b,
                     D: tl.constexpr, FULL: tl.constexpr, NSPLIT: tl.constexpr, BLOCK: tl.constexpr):
    D2: tl.constexpr = D // 2
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < n_rows)[:, None]
    c = tl.arange(0, D2)
    off = rows.to(tl.int64)[:, None] * D + c[None, :]
    x_lo = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    x_hi = tl.load(x_ptr + off + D2, mask=ok, other=0.0).to(tl.float32)
    y_lo, y_hi = rotate_halves(x_lo, x_hi, load_hmat(h_ptr, D2), inv_sqrt_b, FULL, NSPLIT)
    tl.store(y_ptr + off, y_lo.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + off + D2, y_hi.to(y_ptr.dtype.element_ty), mask=ok)


def fast_hadamard_available() -> bool:
    return _fht is not None


def hadamard(x: torch.Tensor, order: int, use_fht: bool = True) -> torch.Tensor:
    """R x along the last dim; R = I kron H_order/sqrt(order) (natural-order Sylvester), its own inverse."""
    d = x.shape[-1]
    if order <= 0 or order & (order - 1) or d % order:
        raise ValueError(f"Hadamard order {order} must be a power of two dividing {d}")
    if use_fht and _fht is not None and x.is_cuda and x.dtype in _NSPLIT:
        y = _fht(x.reshape(-1, d // order, order), scale=1.0 / math.sqrt(order))
        return y.reshape(x.shape)
    if x.dtype not in _NSPLIT or d < 32 or d & (d - 1) or not (x.is_cuda or INTERPRET):
        return rotate(x.double(), order).to(x.dtype)
    xs = x.reshape(-1, d).contiguous()
    y = torch.empty_like(xs)
    hmat, full, inv = rotation_args(order, d, x.device)
    block = 16 if INTERPRET else 64
    grid = (triton.cdiv(xs.shape[0], block),)
    _hadamard_kernel[grid](xs, y, hmat, xs.shape[0], inv, D=d, FULL=full, NSPLIT=_NSPLIT[x.dtype], BLOCK=block)
    return y.reshape(x.shape)
