"""Torch dequantization of the simple GGUF block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32).

Used when loading onto an accelerator: the packed bytes go to the device (3-7x fewer bytes than
float32) and expand there, instead of gguf's single-threaded numpy code on the host. Layouts follow
ggml-quants.c; the tests check them bit-exact against `gguf.quants.dequantize`. Other types
(K-quants, IQ*) return None and the caller falls back to gguf's numpy path.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 = 0, 1, 2, 3, 6, 7, 8, 30
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34}  # per 32 elements
SUPPORTED = (F32, F16, BF16, *BLOCK_BYTES)


def _raw(data: np.ndarray, device: torch.device) -> Tensor:
    with warnings.catch_warnings():  # the memory map is read-only; we only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data).to(device)


def _f16(b: Tensor, at: int) -> Tensor:
    return b[:, at : at + 2].contiguous().view(torch.float16).float()  # [n, 1]


def _nibbles(qs: Tensor) -> Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=1)  # low nibbles are elements 0..15, high 16..31


def _high_bits(qh: Tensor) -> Tensor:
    bits = qh.contiguous().view(torch.int32)  # [n, 1], little-endian like the file
    shifts = torch.arange(32, dtype=torch.int32, device=qh.device)
    return ((bits >> shifts) & 1).to(torch.uint8) << 4  # bit j is the 5th bit of element j


def dequantize(data: np.ndarray, ggml_type: int, device: torch.device) -> Tensor | None:
    """Raw bytes of one tensor -> float32 [n_elements] on `device`, or None if the type is not handled."""
    if ggml_type not in SUPPORTED:
        return None
    raw = _raw(data, device)
    if ggml_type == F32:
        return raw.view(torch.float32)
    if ggml_type == F16:
        return raw.view(torch.float16).float()
    if ggml_type == BF16:
        return raw.view(torch.bfloat16).float()
    b = raw.view(-1, BLOCK_BYTES[ggml_type])
    if ggml_type == Q8_0:
        q = b[:, 2:].contiguous().view(torch.int8).float()
        return (_f16(b, 0) * q).reshape(-1)
    if ggml_type == Q4_0:
        return (_f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)).reshape(-1)
    if ggml_type == Q4_1:
        return (_f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)).reshape(-1)
    if ggml_type == Q5_0:
        q = (_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])).float() - 16
        return (_f16(b, 0) * q).reshape(-1)
    # Q5_1
    q = (_nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])).float()
    return (_f16(b, 0) * q + _f16(b, 2)).reshape(-1)
