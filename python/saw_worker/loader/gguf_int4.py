"""Codes, scales and zeros of a 4-bit affine GGUF tensor, with gguf's own dequantizer as the oracle.

In Q4_0, Q4_1 and Q4_K every group of 32 consecutive elements is `scale * code + zero` with 4-bit codes, and
each block ends in its code nibbles (block_size / 2 bytes: Q4_0 bytes 2..18 of 18, Q4_1 4..20 of 20, Q4_K
16..144 of 144). Dequantizing the blocks with every nibble set to 0 gives each group's zero, with every nibble 15
gives zero + 15 * scale; the codes follow from the real weights, and s * q + z is checked against them, so no
per-format decoder is written here and a mismatch falls back to the dense weight.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.linear import GROUP, Int4Parts

AFFINE_INT4 = ("Q4_0", "Q4_1", "Q4_K")


def int4_parts(raw: np.ndarray, ggml_type: int, w: np.ndarray) -> Int4Parts | None:
    """raw: the tensor's blocks, uint8 [rows, bytes per row]; w: gguf's float32 dequantization [rows, cols].

    None unless the type is 4-bit affine per group of 32 and s * q + z reproduces w (to fp32 rounding)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    rows, cols = w.shape
    if qtype.name not in AFFINE_INT4 or cols % GROUP:
        return None
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)

    def with_codes(nibbles: int) -> np.ndarray:  # [rows, groups]: every code of every group set to `nibbles`
        b = blocks.copy()
        b[:, type_size - block // 2 :] = nibbles * 0x11
        return np.asarray(dequantize(b.reshape(rows, -1), qtype), dtype=np.float32).reshape(rows, -1, GROUP)[..., 0]

    zero = with_codes(0)
    scale = (with_codes(15) - zero) / np.float32(15)
    g = w.reshape(rows, -1, GROUP)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((g - zero[..., None]) / scale[..., None])
    codes = np.where(scale[..., None] == 0, 0, np.clip(np.nan_to_num(q), 0, 15)).astype(np.uint8)
    back = codes * scale[..., None] + zero[..., None]
    tol = np.float32(2**-17) * (np.abs(zero) + 16 * np.abs(scale))[..., None]
    if not np.all(np.abs(back - g) <= tol):  # NaN or inf scales fail here too
        return None
    return Int4Parts(torch.from_numpy(codes.reshape(rows, cols)), torch.from_numpy(scale), torch.from_numpy(zero))
