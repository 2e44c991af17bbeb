"""Projections over quantized weights on the CPU for decode steps, which read every weight once per step.

Where saw's native matvec runs (saw_router._native built, an AVX2 CPU), a GGUF's quantized weights (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q6_K: projections and lm_head) are also kept as the file's own blocks (`BlockWeight`,
`PackedBlocks`, `pack_blocks`), and `linear` runs up to `BLOCKS_MAX_ROWS` rows on them (cpu-kernels/src/quant.rs:
Q8 activations, integer dot products, on the kernels' thread pool), in bf16 or float32 models alike. Otherwise, for
bf16:

A GGUF weight that is `scale * code + zero` per group of 32 along K (Q4_0, Q4_1, Q4_K) is also kept packed for
torch's int4 CPU kernel, which reads a quarter of bf16's bytes.

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

from .. import native
from ..native import tensor

GROUP = 32
# Rows up to which the packed kernel beats the dense bf16 GEMM. The 120 layer GEMMs of smollm2-135m's shapes, all 30
# layers' weights in turn, on a 2-core EPYC (2026-12-03), int4 vs bf16 ms: 1 row 4.1 vs 13.4, 4: 6.6 vs 20.0,
# 8: 11.4 vs 21.2, 16: 21.6 vs 25.8, 24: 31.7 vs 29.5, 32: 41.6 vs 32.3.
INT4_MAX_ROWS = 16
# The same for the int8 lm_head. smollm2-135m's [49152, 576] on the same machine (2026-12-04), int8 vs bf16 ms:
# 1 row 2.3 vs 3.0, 4: 3.4 vs 5.0, 8: 5.5 vs 4.6 (the int8 kernel's time grows with the rows, the GEMM's barely).
INT8_MAX_ROWS = 4
# The same for the native kernel on the GGUF's blocks, against dense float32 (no AVX512-BF16 on that machine). All
# 24 layers' projections of qwen2.5-coder-0.5b in turn on a 2-core EPYC (2026-12-06), blocks vs dense ms: 1 row
# 24.4 vs 82.0, 4: 48.9 vs 236.7, 8: 84.6-140 vs 204-214, 16: 159 vs 243; smollm2-135m's 16: 56 vs 71, 24: 106 vs
# 88. Kept at 8, below that crossover, for bf16's dense GEMM, which reads half float32's bytes (not measured).
BLOCKS_MAX_ROWS = 8
# ggml types the native kernel reads (cpu-kernels/src/quant.rs, Format)
BLOCK_TYPES = frozenset({2, 3, 6, 7, 8, 12, 14})  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q6_K

_matvec = native.op("cpu_matvec")
_matvec_available = native.op("cpu_matvec_available")


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


class BlockWeight(NamedTuple):
    """What a loader yields with a GGUF weight the native kernel reads: the dense tensor and the file's blocks."""

    dense: Tensor
    ggml_type: int
    blocks: Tensor  # uint8 [N, bytes per row]


class PackedBlocks(NamedTuple):
    """A weight as GGUF blocks, one segment per row range of its own type (q | k | v), with the kernel's fields."""

    segments: tuple[Tensor, ...]  # uint8 [rows, bytes per row], held for the addresses in `fields`
    fields: dict[str, int]
    out_features: int


def blocks_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """The native kernel takes bf16 and float32 activations on CPUs with AVX2 (FMA, F16C)."""
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and _matvec is not None
            and _matvec_available is not None and bool(_matvec_available()))


def pack_blocks(segments: list[tuple[int, Tensor]], k: int) -> PackedBlocks:
    """(ggml type, uint8 blocks [rows, bytes per row]) stacked in order -> the kernel's weight over k columns; its
    calls use the threads torch has now (the worker's count: decode steps may run torch on fewer)."""
    data = tuple(b.contiguous() for _, b in segments)
    fields = {"segments": len(data), "k": k, "threads": torch.get_num_threads()}
    for i, ((ggml_type, _), b) in enumerate(zip(segments, data, strict=True)):
        fields |= {**tensor(f"w{i}", b, torch.uint8), f"w{i}_type": ggml_type, f"w{i}_rows": b.shape[0]}
    return PackedBlocks(data, fields, sum(b.shape[0] for b in data))


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


Packed = PackedInt4 | PackedInt8 | PackedBlocks
_MAX_ROWS = {PackedInt4: INT4_MAX_ROWS, PackedInt8: INT8_MAX_ROWS, PackedBlocks: BLOCKS_MAX_ROWS}


def linear(x: Tensor, weight: Tensor, packed: Packed | None, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through the packed weight when there is one and x has few rows."""
    k = x.shape[-1]
    rows = x.numel() // k
    if packed is None or rows > _MAX_ROWS[type(packed)]:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, k).contiguous()
    if isinstance(packed, PackedBlocks):
        assert _matvec is not None
        if x2.dtype not in (torch.bfloat16, torch.float32) or x2.device.type != "cpu":
            raise ValueError(f"the native matvec takes bf16 or float32 CPU rows, got {x2.dtype} on {x2.device}")
        y = x2.new_empty(rows, packed.out_features)
        # the fields by hand, not through native.tensor's checks and f-strings (~100 calls a step); x2 and y are
        # contiguous CPU tensors of the dtype checked above
        _matvec(packed.fields | {"x": x2.data_ptr(), "x_len": x2.numel(), "out": y.data_ptr(), "out_len": y.numel(),
                                 "act_f32": x2.dtype == torch.float32})
    # the torch._ bindings, not torch.ops.aten's: ~1 us less a call (its Python dispatch), ~120 calls a step
    elif isinstance(packed, PackedInt8):
        y = torch._weight_int8pack_mm(x2, packed.weight, packed.scales)
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, packed.weight, GROUP, packed.scales_and_zeros)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias
