"""Triton kernels of the paged KV cache (docs/kernels.md): write, decode, extend, the bf16 window
ring, Hadamard; and the small fused kernels of a decoder layer (q/k norm + RoPE, SiLU-and-mul, add + RMSNorm)."""

from saw_kernels.decode import choose_num_splits, decode_attention
from saw_kernels.extend import extend_attention
from saw_kernels.fused import add_rms_norm, qk_norm_rope, silu_mul
from saw_kernels.hadamard import fast_hadamard_available, hadamard
from saw_kernels.window import Ring, write_window
from saw_kernels.write import write_kv

__all__ = [
    "Ring",
    "add_rms_norm",
    "choose_num_splits",
    "decode_attention",
    "extend_attention",
    "fast_hadamard_available",
    "hadamard",
    "qk_norm_rope",
    "silu_mul",
    "write_kv",
    "write_window",
]
