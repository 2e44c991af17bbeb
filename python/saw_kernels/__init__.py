"""Triton kernels of the paged KV cache (docs/kernels.md): write, decode, extend, the bf16 window
ring, Hadamard; and the small fused kernels of a decoder layer (q/k norm + RoPE, SiLU-and-mul, add + RMSNorm).

The cache kernels take one layer's cache as a saw_kv.cache.LayerCache (re-exported here) and their launch knobs
as a small frozen tuning struct (WriteTuning, DecodeTuning, ExtendTuning) whose defaults are the measured ones."""

from saw_kernels.decode import DecodeTuning, choose_num_splits, decode_attention
from saw_kernels.extend import ExtendTuning, extend_attention
from saw_kernels.fused import add_rms_norm, qk_norm_rope, silu_mul
from saw_kernels.hadamard import fast_hadamard_available, hadamard
from saw_kernels.window import Ring, write_window
from saw_kernels.write import WriteTuning, write_kv
from saw_kv.cache import LayerCache

__all__ = [
    "DecodeTuning",
    "ExtendTuning",
    "LayerCache",
    "Ring",
    "WriteTuning",
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
