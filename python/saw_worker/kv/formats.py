"""Reference definition of the KV-cache formats (ARCHITECTURE.md section 3).

This module *is* the spec the Triton kernels are tested against: plain torch, runs on CPU,
math in fp32. A row is one (token, KV head) vector of length D.

INT4 token-wise: lo = min(x), scale = max(max(x) - lo, EPS) / 15, both rounded to fp16 (what
is stored), then q = clamp(round((x - lo) / scale), 0, 15) with the stored values, so that
dequantization q * scale + lo uses exactly the numbers the quantizer used. torch.round rounds
half to even; kernels use rint, which does the same.

Packing: byte j holds element j in the low nibble and element j + D/2 in the high nibble.

BDR: x -> R x with R = I_(D/b) kron H_b / sqrt(b), H_b the natural-order Sylvester Hadamard.
R is symmetric and orthogonal, hence its own inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

EPS = 1e-5
PARAM_DTYPE = torch.float16  # storage dtype of (scale, lo)
KV_FORMATS = ("bf16", "int4", "int4-bdr")
HADAMARD_ORDERS = (16, 32, 64, 128)


def default_kv_options(kv: str, head_dim: int) -> tuple[int, bool]:
    """(Hadamard order, K centering) when the user names neither, chosen from the accuracy
    measurements (docs/accuracy.md §5): centering helps every INT4 model we measured and rescues
    Qwen2's biased K; at head_dim 64 order 32 beat 64 on Qwen; at 128 the paper's b = 128."""
    return (128 if head_dim >= 128 else 32), kv != "bf16"


@dataclass(frozen=True)
class KVFormat:
    """What `--kv` and its modifiers mean for one model."""

    name: str  # bf16 | int4 | int4-bdr
    head_dim: int
    hadamard_order: int = 128  # used by int4-bdr only
    rotate_v: bool = False
    k_center: bool = False

    def __post_init__(self) -> None:
        if self.name not in KV_FORMATS:
            raise ValueError(f"unknown KV format {self.name!r}; choose one of {', '.join(KV_FORMATS)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        if self.rotate_v and self.name != "int4-bdr":
            raise ValueError("--rotate-v needs --kv int4-bdr")
        if self.k_center and self.name == "bf16":
            raise ValueError("--k-center applies to the INT4 formats only")
        if self.rotated:
            if self.hadamard_order not in HADAMARD_ORDERS:
                raise ValueError(f"--hadamard-order must be one of {HADAMARD_ORDERS}, got {self.hadamard_order}")
            if self.head_dim % self.hadamard_order:
                raise ValueError(f"--hadamard-order {self.hadamard_order} does not divide head_dim {self.head_dim}")

    @staticmethod
    def make(name: str, head_dim: int, hadamard_order: int = 128, rotate_v: bool = False,
             k_center: bool = False) -> KVFormat:
        """Build a format, capping the Hadamard order at head_dim as `--hadamard-order` promises."""
        return KVFormat(name, head_dim, min(hadamard_order, head_dim), rotate_v, k_center)

    @property
    def quantized(self) -> bool:
        return self.name != "bf16"

    @property
    def rotated(self) -> bool:
        return self.name == "int4-bdr"

    def bytes_per_token_head(self) -> int:
        """Bytes one (token, KV head) costs for K and V together."""
        if not self.quantized:
            return 2 * self.head_dim * 2
        return 2 * (self.head_dim // 2 + 2 * PARAM_DTYPE.itemsize)


@cache
def _hadamard_cpu(order: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(order)


def hadamard_matrix(order: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalized natural-order Sylvester Hadamard H_b / sqrt(b)."""
    if order <= 0 or order & (order - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {order}")
    return _hadamard_cpu(order).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, order: int) -> torch.Tensor:
    """Apply R = I kron H_b/sqrt(b) along the last dim (R is its own inverse)."""
    d = x.shape[-1]
    h = hadamard_matrix(order, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], d // order, order) @ h).reshape(x.shape)


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x[..., D] (any float dtype) -> (packed uint8 [..., D/2], params fp16 [..., 2] = (scale, lo))."""
    xf = x.float()
    lo = xf.amin(-1)
    scale = torch.clamp(xf.amax(-1) - lo, min=EPS) / 15.0
    params = torch.stack([scale, lo], -1).to(PARAM_DTYPE)
    s, m = params.float().unbind(-1)
    q = torch.clamp(torch.round((xf - m[..., None]) / s[..., None]), 0, 15).to(torch.uint8)
    half = x.shape[-1] // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed, params


def dequantize_int4(packed: torch.Tensor, params: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_int4 up to rounding: q * scale + lo, in fp32, cast to dtype."""
    q = torch.cat([packed & 0xF, packed >> 4], -1).float()
    s, m = params.float().unbind(-1)
    return (q * s[..., None] + m[..., None]).to(dtype)


def encode_k(k: torch.Tensor, fmt: KVFormat, k_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The vector that is quantized for K: center (if on), then rotate (if int4-bdr). fp32."""
    x = k.float()
    if fmt.k_center and k_mean is not None:
        x = x - k_mean.float()
    return rotate(x, fmt.hadamard_order) if fmt.rotated else x


def encode_v(v: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    x = v.float()
    return rotate(x, fmt.hadamard_order) if fmt.rotate_v else x


def encode_q(q: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Queries meet keys in the rotated space: (Rq).(Rk) = q.k."""
    return rotate(q.float(), fmt.hadamard_order) if fmt.rotated else q.float()


def decode_o(o: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Attention over rotated V gives R o; rotate back once per head."""
    return rotate(o, fmt.hadamard_order) if fmt.rotate_v else o
