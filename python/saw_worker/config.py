"""Model and tokenizer descriptions shared by the loaders, the models and the engine.

`ModelConfig` is the one shape description every model class and the engine read; it comes from
an HF `config.json` dict (`ModelConfig.from_hf`) or from GGUF metadata (loader/gguf_file.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF `architectures[0]` / `model_type` -> our architecture name. Everything else is refused.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class UnsupportedArchitectureError(ValueError):
    """The config names an architecture saw cannot run (e.g. MLA models such as DeepseekV2/V3)."""


def _hf_architecture(d: dict[str, Any]) -> tuple[str, str]:
    """(our name, the name the config uses) or UnsupportedArchitectureError."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a], a
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type], model_type
    named = archs[0] if archs else (model_type or "<none>")
    if "kv_lora_rank" in d:
        why = " (multi-head latent attention is not supported)"
    else:  # e.g. Qwen3MoeForCausalLM: SGLang's model code with saw's KV pool and kernels
        why = " (--engine sglang serves more architectures: docs/sglang.md)"
    raise UnsupportedArchitectureError(
        f"unsupported model architecture {named!r}{why}; saw runs LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # qkv bias (Qwen2)
    qk_norm: bool  # per-head q/k RMSNorm (Qwen3)

    @staticmethod
    def from_hf(d: dict[str, Any]) -> ModelConfig:
        arch, named = _hf_architecture(d)
        if d.get("use_sliding_window"):
            raise UnsupportedArchitectureError(f"{named} with use_sliding_window=true is not supported")
        # transformers >= 4.5x nests rope settings in `rope_parameters`; older configs use the flat keys.
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        return ModelConfig(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has qkv bias (its config has no flag); Llama may set attention_bias.
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
        )

    def projection_params(self) -> int:
        """Parameters of one layer's projections: q, k, v, o and gate, up, down."""
        h, d, hq, hkv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        return h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * self.intermediate_size

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json of this model (from_hf reads it back as this config)."""
        scaling = self.rope_scaling
        if scaling is not None and scaling.get("rope_type") == "freq_factors":
            raise UnsupportedArchitectureError("a GGUF's per-frequency RoPE factors (Llama 3.1+) have no HF config "
                                               "form saw can write")
        return {"architectures": [next(k for k, v in SUPPORTED_ARCHITECTURES.items() if v == self.architecture)],
                "model_type": self.architecture, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "rope_theta": self.rope_theta, "rope_scaling": scaling,
                "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
                "hidden_act": "silu", "torch_dtype": "bfloat16"}

    def replace(self, **changes: Any) -> ModelConfig:
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer_json: str  # HF tokenizers JSON (for the Rust router's `tokenizers` crate)
    chat_template: str  # jinja
    bos_token: str
    eos_token: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
