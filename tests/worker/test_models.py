"""DecoderLM against the transformers reference implementations, same weights, tiny random configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from saw_worker.config import ModelConfig
from saw_worker.models import DecoderLM, FullCausalAttention
from saw_worker.models.rope import inv_freq

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # GQA, head_dim 64, tied embeddings (SmolLM2 shape in miniature)
    "llama-gqa-d64-tied": (
        "LlamaConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    ),
    # MHA, head_dim 128, Llama 3 rope scaling
    "llama-mha-d128-llama3rope": (
        "LlamaConfig",
        dict(num_attention_heads=2, num_key_value_heads=2, head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    # qkv bias, 7 q / 1 kv heads (Qwen2.5-0.5B-like odd group)
    "qwen2-bias-gqa-d64": (
        "Qwen2Config",
        dict(num_attention_heads=7, num_key_value_heads=1, head_dim=64, rope_theta=1e6),
    ),
    # q/k RMSNorm, head_dim 128 (Qwen3-8B-like)
    "qwen3-qknorm-d128": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128, rope_theta=1e6),
    ),
}
MODEL_CLASS = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def _reference(case: str) -> Any:
    cfg_cls, kw = CASES[case]
    base = dict(
        vocab_size=211,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg = getattr(transformers, cfg_cls)(**{**base, **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = getattr(transformers, MODEL_CLASS[cfg_cls])(cfg).eval()
    with torch.no_grad():  # perturb everything (norm weights, biases too) so a mis-mapped tensor shows
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _ours(ref: Any, cache: bool = False) -> DecoderLM:
    cfg = ModelConfig.from_hf(ref.config.to_dict())
    model = DecoderLM(cfg, FullCausalAttention(cfg.num_heads, cfg.num_kv_heads, cache=cache), dtype=torch.float32)
    model.load_weights(ref.state_dict().items())
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str) -> None:
    ref = _reference(case)
    model = _ours(ref)
    t = 23
    ids = torch.randint(0, ref.config.vocab_size, (t,), generator=torch.Generator().manual_seed(1))
    # Start at a position past original_max_position_embeddings so the llama3 scaled band is exercised.
    pos = torch.arange(100, 100 + t)
    with torch.no_grad():
        want = ref(input_ids=ids[None], position_ids=pos[None]).logits[0].float()
        got = model.compute_logits(model(ids, pos))
    assert got.dtype == torch.float32 and got.shape == (t, ref.config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-gqa-d64-tied", "qwen3-qknorm-d128"])
def test_incremental_decode_matches_full(case: str) -> None:
    """Prefill then one token at a time through a caching Attention equals one full pass."""
    ref = _reference(case)
    full, inc = _ours(ref), _ours(ref, cache=True)
    ids = torch.randint(0, ref.config.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = full.compute_logits(full(ids, torch.arange(12)))
        parts = [inc.compute_logits(inc(ids[:8], torch.arange(8)))]
        for i in range(8, 12):
            parts.append(inc.compute_logits(inc(ids[i : i + 1], torch.tensor([i]))))
    torch.testing.assert_close(torch.cat(parts), want, atol=1e-4, rtol=1e-4)


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        head_dim=128, num_attention_heads=2, hidden_size=256, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(inv_freq(128, 500000.0, LLAMA3_ROPE), want.float())


def test_bf16_forward_is_finite_and_close() -> None:
    ref = _reference("qwen3-qknorm-d128")
    model32 = _ours(ref)
    cfg = model32.config
    model16 = DecoderLM(cfg, FullCausalAttention(cfg.num_heads, cfg.num_kv_heads), dtype=torch.bfloat16)
    model16.load_weights((k, v.bfloat16()) for k, v in ref.state_dict().items())
    ids = torch.arange(10) * 7
    with torch.no_grad():
        a = model32.compute_logits(model32(ids, torch.arange(10)))
        b = model16.compute_logits(model16(ids, torch.arange(10)))
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_dummy_init_is_deterministic_and_finite() -> None:
    cfg = ModelConfig.from_hf(_reference("qwen2-bias-gqa-d64").config.to_dict())
    attn = FullCausalAttention(cfg.num_heads, cfg.num_kv_heads)
    a, b = DecoderLM(cfg, attn), DecoderLM(cfg, attn)
    a.init_random_(seed=3)
    b.init_random_(seed=3)
    ids = torch.arange(5)
    with torch.no_grad():
        la, lb = a.compute_logits(a(ids, ids)), b.compute_logits(b(ids, ids))
    assert torch.equal(la, lb) and torch.isfinite(la).all()


def test_missing_weight_is_reported() -> None:
    ref = _reference("llama-gqa-d64-tied")
    cfg = ModelConfig.from_hf(ref.config.to_dict())
    model = DecoderLM(cfg, FullCausalAttention(cfg.num_heads, cfg.num_kv_heads))
    sd = {k: v for k, v in ref.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="missing"):
        model.load_weights(sd.items())


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_bf16_tracks_fp32_reference(case: str) -> None:
    """bf16 on CUDA (the serving dtype) stays close to the fp32 transformers reference."""
    ref = _reference(case)
    cfg = ModelConfig.from_hf(ref.config.to_dict())
    dev = torch.device("cuda")
    model = DecoderLM(cfg, FullCausalAttention(cfg.num_heads, cfg.num_kv_heads), device=dev, dtype=torch.bfloat16)
    model.load_weights((k, v.to(dev, torch.bfloat16)) for k, v in ref.state_dict().items())
    ids = torch.randint(0, ref.config.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(64)
    with torch.no_grad():
        want = ref(input_ids=ids[None], position_ids=pos[None]).logits[0].float()
        got = model.compute_logits(model(ids.to(dev), pos.to(dev))).cpu()
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.03, f"relative error {rel:.4f}"
