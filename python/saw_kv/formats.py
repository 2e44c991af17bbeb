"""Reference definition of the KV-cache formats.

This module *is* the spec the Triton kernels are tested against: plain torch, runs on CPU,
math in fp32. A row is one (token, KV head) vector of length D.

INT4 token-wise: lo = min(x), scale = max(max(x) - lo, EPS) / 15, both rounded to fp16 (what
is stored), then q = clamp(round((x - lo) / scale), 0, 15) with the stored values, so that
dequantization q * scale + lo uses exactly the numbers the quantizer used. torch.round rounds
half to even; kernels use rint, which does the same.

Packing: byte j holds element j in the low nibble and element j + D/2 in the high nibble.

BDR: x -> R x with R = I_(D/b) kron H_b / sqrt(b), H_b the natural-order Sylvester Hadamard.
R is symmetric and orthogonal, hence its own inverse.

K scale (k_scale, as QServe's SmoothAttention): keys are divided per channel by a calibrated
lambda [Hkv, D] before centering and rotation, queries multiplied by it, so q . k is unchanged while
K's outlier channels stop setting every row's INT4 range. The K mean (k_center) is the mean of the
scaled keys k / lambda. The stored K row is R (k / lambda - mean); the query that meets it R (q lambda).
The engine applies lambda in the model, after RoPE (DecoderLayer.k_scale), so the cache, the ring and
the kernels receive q lambda and k / lambda; encode_k / encode_q with k_scale define what that stores.

Window (window = W) and sinks (sinks = S): each step attends to its new tokens, to the W tokens before
them and to the request's first S tokens at bf16 (kept in a per-request ring, kv/pool.py), to the other
tokens from the INT4 pages. Every token is still written to the pages, so nothing is quantized later.
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
MAX_WINDOW = 256
MAX_SINKS = 64


DEFAULT_WINDOW = 16
DEFAULT_SINKS = 4
DEFAULT_K_SCALE_ALPHA = 0.5


@dataclass(frozen=True)
class KVDefaults:
    """What the INT4 options are when the user names none, chosen from the accuracy measurements
    (docs/accuracy.md §5): centering and the K scale help every INT4 model we measured (the scale
    rescues Qwen2's biased K); at head_dim 64 order 32 beat 64 on Qwen; at 128 the paper's b = 128;
    4 sinks and a 16-token bf16 window bring both Qwen's and Llama's KL under FP8's, for less window
    bytes than a 32-token window without sinks (§0)."""

    hadamard_order: int
    k_center: bool
    k_scale: bool
    window: int
    sinks: int


def default_kv_options(kv: str, head_dim: int) -> KVDefaults:
    quantized = kv != "bf16"
    return KVDefaults(128 if head_dim >= 128 else 32, quantized, quantized, DEFAULT_WINDOW if quantized else 0,
                      DEFAULT_SINKS if quantized else 0)


@dataclass(frozen=True)
class KVFormat:
    """What `--kv` and its modifiers mean for one model."""

    name: str  # bf16 | int4 | int4-bdr
    head_dim: int
    hadamard_order: int = 128  # used by int4-bdr only
    rotate_v: bool = False
    k_center: bool = False
    k_scale: bool = False  # per-channel K scale folded into q (calibrated lambda)
    window: int = 0  # W: tokens before each step's new ones attended at bf16 (0 = off)
    sinks: int = 0  # S: a request's first tokens attended at bf16 (needs a window)

    def __post_init__(self) -> None:
        if self.name not in KV_FORMATS:
            raise ValueError(f"unknown KV format {self.name!r}; choose one of {', '.join(KV_FORMATS)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        if self.rotate_v and self.name != "int4-bdr":
            raise ValueError("--rotate-v needs --kv int4-bdr")
        if self.k_center and self.name == "bf16":
            raise ValueError("--k-center applies to the INT4 formats only")
        if self.k_scale and self.name == "bf16":
            raise ValueError("--k-scale applies to the INT4 formats only")
        if self.window and self.name == "bf16":
            raise ValueError("--window applies to the INT4 formats only")
        if not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"--window must be in [0, {MAX_WINDOW}], got {self.window}")
        if not 0 <= self.sinks <= MAX_SINKS:
            raise ValueError(f"--sinks must be in [0, {MAX_SINKS}], got {self.sinks}")
        if self.sinks and not self.window:
            raise ValueError("--sinks needs a bf16 window (--window > 0): they share its ring")
        if self.rotated:
            if self.hadamard_order not in HADAMARD_ORDERS:
                raise ValueError(f"--hadamard-order must be one of {HADAMARD_ORDERS}, got {self.hadamard_order}")
            if self.head_dim % self.hadamard_order:
                raise ValueError(f"--hadamard-order {self.hadamard_order} does not divide head_dim {self.head_dim}")

    @staticmethod
    def make(name: str, head_dim: int, hadamard_order: int = 128, rotate_v: bool = False,
             k_center: bool = False, k_scale: bool = False, window: int = 0, sinks: int = 0) -> KVFormat:
        """Build a format, capping the Hadamard order at head_dim as `--hadamard-order` promises."""
        return KVFormat(name, head_dim, min(hadamard_order, head_dim), rotate_v, k_center, k_scale, window, sinks)

    @staticmethod
    def with_defaults(name: str, head_dim: int, hadamard_order: int | None = None, rotate_v: bool = False,
                      k_center: bool | None = None, k_scale: bool | None = None, window: int | None = None,
                      sinks: int | None = None) -> KVFormat:
        """The format with each option not given (None) filled in per model (default_kv_options); window 0
        means no sinks either."""
        d = default_kv_options(name, head_dim)
        window = d.window if window is None else window
        sinks = (d.sinks if window else 0) if sinks is None else sinks
        return KVFormat.make(name, head_dim, hadamard_order or d.hadamard_order, rotate_v,
                             d.k_center if k_center is None else k_center, d.k_scale if k_scale is None else k_scale,
                             window, sinks)

    def describe(self) -> str:
        """The format with its options, as Info and /metrics report it (e.g. int4-bdr:b32+center+scale+s4+w16)."""
        if not self.quantized:
            return self.name
        opts = [f"b{self.hadamard_order}"] if self.rotated else []
        opts += [name for name, on in (("rotv", self.rotate_v), ("center", self.k_center), ("scale", self.k_scale))
                 if on]
        if self.sinks:
            opts.append(f"s{self.sinks}")
        if self.window:
            opts.append(f"w{self.window}")
        return f"{self.name}:{'+'.join(opts)}" if opts else self.name

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

    @property
    def ring_slots(self) -> int:
        """Rows of a request's bf16 ring: its sinks, then its window."""
        return self.sinks + self.window

    def window_bytes_per_head(self) -> int:
        """Bytes one request's bf16 window and sinks cost per KV head (K and V), whatever its length."""
        return 2 * self.ring_slots * self.head_dim * 2


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


def encode_k(k: torch.Tensor, fmt: KVFormat, k_mean: torch.Tensor | None = None,
             k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The vector that is quantized for K [..., Hkv, D]: scale (k / lambda), center, rotate, each where
    the format has it and its tensor is given. fp32."""
    x = k.float()
    if fmt.k_scale and k_scale is not None:
        x = x / k_scale.float()
    if fmt.k_center and k_mean is not None:
        x = x - k_mean.float()
    return rotate(x, fmt.hadamard_order) if fmt.rotated else x


def decode_k(x: torch.Tensor, fmt: KVFormat, k_mean: torch.Tensor | None = None,
             k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of encode_k: stored (dequantized) K rows back in the model's space. fp32."""
    x = rotate(x.float(), fmt.hadamard_order) if fmt.rotated else x.float()
    if fmt.k_center and k_mean is not None:
        x = x + k_mean.float()
    if fmt.k_scale and k_scale is not None:
        x = x * k_scale.float()
    return x


def encode_v(v: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    x = v.float()
    return rotate(x, fmt.hadamard_order) if fmt.rotate_v else x


def scale_q(q: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """q [..., Hq, D] times its KV head's lambda [Hkv, D] (query heads grouped as in GQA)."""
    group = q.shape[-2] // k_scale.shape[0]
    return q.float() * k_scale.float().repeat_interleave(group, 0)


def encode_q(q: torch.Tensor, fmt: KVFormat, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Queries meet keys in the stored space: R (q lambda) . R (k / lambda - mean) = q . k - q . (lambda mean),
    a shift per query that softmax ignores."""
    x = scale_q(q, k_scale) if fmt.k_scale and k_scale is not None else q.float()
    return rotate(x, fmt.hadamard_order) if fmt.rotated else x


def decode_o(o: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Attention over rotated V gives R o; rotate back once per head."""
    return rotate(o, fmt.hadamard_order) if fmt.rotate_v else o
