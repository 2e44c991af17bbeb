"""Decoder-only models (Llama, Qwen2/2.5, Qwen3) behind the engine's `Attention` seam."""

from .attention import Attention, FullCausalAttention
from .decoder import DecoderLM

__all__ = ["Attention", "DecoderLM", "FullCausalAttention"]
