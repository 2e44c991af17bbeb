"""Projections over 4-bit weights on the CPU: a GGUF weight that is `scale * code + zero` per group of 32 along K
(Q4_0, Q4_1, Q4_K) is also kept packed for torch's int4 CPU kernel, which reads a quarter of bf16's bytes.

Decode (a few rows) is bound by reading the weights, so `linear` uses the packed weight up to `INT4_MAX_ROWS`
rows; above that the kernel loses to the dense bf16 GEMM (2.3x slower at 1000 rows), so prefill stays dense.
A GGUF's lm_head and its projections that are not packed int4 (Q5_0, Q6_K, Q8_0, ...) are kept as int8 too,
per-row scales (`pack_int8`, DecoderLM.pack_int8_weights), for up to `INT8_MAX_ROWS` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

GROUP = 32
# Rows up to which the packed kernel beats the dense bf16 GEMM. The 120 layer GEMMs of smollm2-135m's shapes, all 30
# layers' weights in turn, on a 2-core EPYC (2026-12-03), int4 vs bf16 ms: 1 row 4.1 vs 13.4, 4: 6.6 vs 20.0,
# 8: 11.4 vs 21.2, 16: 21.6 vs 25.8, 24: 31.7 vs 29.5, 32: 41.6 vs 32.3.
INT4_MAX_ROWS = 16
# The same for the int8 lm_head. smollm2-135m's [49152, 576] on the same machine (2026-12-04), int8 vs bf16 ms:
# 1 row 2.3 vs 3.0, 4: 3.4 vs 5.0, 8: 5.5 vs 4.6 (the int8 kernel's time grows with the rows, the GEMM's barely).
INT8_MAX_ROWS = 4


@dataclass(frozen=True)
class Int4Parts:
    """w[n, k] = scale[n, k // 32] * codes[n, k] + zero[n, k // 32]."""

    codes: Tensor  # uint8 [N, K], 0..15
    scale: Tensor  # float32 [N, K / 32]
    zero: Tensor  # float32 [N, K / 32]

    @staticmethod
    def cat(parts: list[Int4Parts]) -> Int4Parts:
        """Row ranges stacked in order (q | k | v, gate | up)."""
        return Int4Parts(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                         torch.cat([p.zero for p in parts]))


class Int4Weight(NamedTuple):
    """What a loader yields for a 4-bit affine weight: the dense tensor (as for any weight) and its int4 parts."""

    dense: Tensor
    parts: Int4Parts


class PackedInt4(NamedTuple):
    """A weight in the layout of `aten._weight_int4pack_mm_for_cpu`."""

    weight: Tensor  # uint8 [N, K / 2]
    scales_and_zeros: Tensor  # bf16 [K / 32, N, 2]: (scale, zero + 8 * scale); the kernel computes (q - 8) * s + z


class PackedInt8(NamedTuple):
    """A weight in the layout of `aten._weight_int8pack_mm`: w[n, k] = weight[n, k] * scales[n]."""

    weight: Tensor  # int8 [N, K]
    scales: Tensor  # bf16 [N]


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Packed weights pay off only for bf16 on the CPU (the kernel is 10-80x slower than dense in float32)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch, "_weight_int4pack_mm_for_cpu")


def int8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """As int4_supported, for the int8 kernel."""
    return device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch, "_weight_int8pack_mm")


def pack_int8(weight: Tensor) -> PackedInt8:
    """Symmetric per-row int8, scale max |w| / 127 at bf16 (the kernel's dtype); the codes are rounded against that
    stored scale, so rounding it biases no row (the clamp costs the largest elements at most half a step)."""
    w = weight.float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-30).to(torch.bfloat16)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return PackedInt8(codes, scale)


def pack(parts: Int4Parts) -> PackedInt4 | None:
    """The kernel's layout, or None for a shape it does not take (N must be a multiple of 16)."""
    n, k = parts.codes.shape
    if n % 16 or k % GROUP or parts.scale.shape != (n, k // GROUP):
        return None
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(parts.codes.to(torch.int32), 1)
    sz = torch.stack([parts.scale, parts.zero + 8 * parts.scale], -1).transpose(0, 1)
    return PackedInt4(weight, sz.contiguous().to(torch.bfloat16))


def linear(x: Tensor, weight: Tensor, packed: PackedInt4 | PackedInt8 | None, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through the packed weight when there is one and x has few rows."""
    k = x.shape[-1]
    rows = x.numel() // k
    if packed is None or rows > (INT8_MAX_ROWS if isinstance(packed, PackedInt8) else INT4_MAX_ROWS):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k).contiguous()
    # the torch._ bindings, not torch.ops.aten's: ~1 us less a call (its Python dispatch), ~120 calls a step
    if isinstance(packed, PackedInt8):
        y = torch._weight_int8pack_mm(x2, packed.weight, packed.scales)
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, packed.weight, GROUP, packed.scales_and_zeros)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias
