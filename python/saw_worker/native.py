"""saw's native CPU kernels (cpu-kernels/, built into the wheel's saw_router._native) and how a tensor is handed to
them: as its address and element count in a map of fields, after the dtype, device and layout checks made here
(the kernels check every index they touch against those counts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from saw_router import _native
except ImportError:  # a source tree without the built extension (PYTHONPATH=python)
    _native = None


def op(name: str) -> Callable[..., Any] | None:
    """The native function `name`, or None where the module is not built (or is older than the function)."""
    return getattr(_native, name, None)


def tensor(name: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, int]:
    """A contiguous CPU tensor as the kernels take it: address and element count."""
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name}: needs a contiguous CPU {dtype} tensor, got {t.dtype} {tuple(t.stride())} "
                         f"on {t.device}")
    return {name: t.data_ptr(), f"{name}_len": t.numel()}


def rows(name: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, int]:
    """Activations [T, H, D] whose rows may be strided (views into the fused qkv output): address, the elements from
    the first row's start to the last row's end, and the row stride."""
    if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 3 or t.stride()[1:] != (t.shape[2], 1):
        raise ValueError(f"{name}: needs CPU {dtype} rows of [H, D] (last two dims contiguous), got {t.dtype} "
                         f"{tuple(t.shape)} strides {tuple(t.stride())} on {t.device}")
    extent = (t.shape[0] - 1) * t.stride(0) + t.shape[1] * t.shape[2] if t.shape[0] else 0
    return {name: t.data_ptr(), f"{name}_len": extent, f"{name}_stride": t.stride(0)}
