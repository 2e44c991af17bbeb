"""GGUF files: config and tokenizer from metadata, weights dequantized to the target dtype.

llama.cpp's converter permutes the rows of Q and K for the `llama` architecture (its RoPE rotates
interleaved pairs); we undo that so the model's rotate-half RoPE applies. Qwen2/Qwen3 files use
NEOX RoPE and are stored unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from .errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
_SUPPORTED = ("llama", "qwen2", "qwen3")
# Architectures llama.cpp knows that use multi-head latent attention.
_MLA = ("deepseek2", "deepseek3", "kimi", "minicpm3", "glm4moe_lite")

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def open_reader(path: Path) -> Any:
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt: the reader fails in many ways
        raise ModelLoadError(f"corrupt GGUF file {path}: {type(e).__name__}: {e}") from None


def read_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        v = field.contents()
        meta[key] = v
    return meta


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], reader: Any) -> ModelConfig:
    arch = str(meta.get("general.architecture", "<none>"))
    if arch not in _SUPPORTED:
        why = " (multi-head latent attention is not supported)" if arch in _MLA else ""
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}{why}; saw runs {', '.join(_SUPPORTED)}")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    if "rope_freqs.weight" in tensor_names:  # Llama 3.1+: per-frequency divisors stored as a tensor
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(t.data).ravel()]}
    elif meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
    )


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name (None: not a model weight, e.g. rope_freqs)."""
    m = _BLK.match(gguf_name)
    if m:
        i, base, kind = m.groups()
        if base not in _BLOCK_NAMES:
            raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{i}.{_BLOCK_NAMES[base]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    if base == "rope_freqs":
        return None
    raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` (rows of each head: interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_weights(
    reader: Any, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, Tensor]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        try:
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantize GGUF tensor {t.name} ({t.tensor_type.name}): {e}") from None
        shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGUF lists dims fastest-first
        a = a.reshape(shape)
        if cfg.architecture == "llama":
            if t.name.endswith(("attn_q.weight", "attn_q.bias")):
                a = _unpermute(a, cfg.num_heads)
            elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
                a = _unpermute(a, cfg.num_kv_heads)
        yield name, torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
