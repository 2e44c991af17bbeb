"""Triton kernels of the paged KV cache (ARCHITECTURE.md section 4): write, decode, extend, Hadamard."""

from saw_kernels.decode import choose_num_splits, decode_attention
from saw_kernels.extend import extend_attention
from saw_kernels.hadamard import fast_hadamard_available, hadamard
from saw_kernels.write import write_kv

__all__ = [
    "choose_num_splits",
    "decode_attention",
    "extend_attention",
    "fast_hadamard_available",
    "hadamard",
    "write_kv",
]
