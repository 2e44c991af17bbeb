"""Int4 projections on the CPU: GGUF codes/scales/zeros through gguf's dequantizer (loader/gguf_int4.py), the
packed kernel against the dense bf16 linear (models/linear.py), and smollm2-135m decode with and without them; the
int8 lm_head likewise; decode on the GGUF's own blocks (the native matvec, test_cpu_matvec.py for the kernel)
against the dense float32 model, smollm2-135m and qwen2.5-coder-0.5b."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from saw_worker.config import ModelConfig
from saw_worker.loader.aliases import cache_dir
from saw_worker.loader.gguf_int4 import int4_parts
from saw_worker.models import DecoderLM, FullCausalAttention
from saw_worker.models.linear import (
    INT4_MAX_ROWS,
    INT8_MAX_ROWS,
    Int4Parts,
    PackedInt8,
    blocks_supported,
    int4_supported,
    int8_supported,
    linear,
    pack,
    pack_int8,
)

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(not int4_supported(CPU, torch.bfloat16), reason="no int4 CPU kernel in this torch")
needs_int8 = pytest.mark.skipif(not int8_supported(CPU, torch.bfloat16), reason="no int8 CPU kernel in this torch")


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Normal weights with outlier columns (a large one, a shifted one) and an all-zero group."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    a[:, 7] *= 50
    a[:, cols // 2 + 3] += 30
    a[1, 32:64] = 0
    return a


def _raw(a: np.ndarray, qt: Q) -> np.ndarray:
    return np.ascontiguousarray(quantize(a, qt)).view(np.uint8).reshape(a.shape[0], -1)


def _q4_k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q4_K rows (gguf.quants cannot quantize to Q4_K): fp16 d and dmin, 12 bytes of 6-bit scales and
    mins, 128 bytes of nibbles per 256 elements."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    d = (rng.random(n) * 0.01 + 1e-4).astype(np.float16).view(np.uint8).reshape(n, 2)
    dmin = (rng.random(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    rest = rng.integers(0, 256, (n, 140), dtype=np.uint8)
    return np.concatenate([d, dmin, rest], axis=1).reshape(rows, -1)


def _reconstruct(p: Int4Parts) -> np.ndarray:
    rows, cols = p.codes.shape
    g = p.codes.numpy().reshape(rows, -1, 32).astype(np.float32)
    return (g * p.scale.numpy()[..., None] + p.zero.numpy()[..., None]).reshape(rows, cols)


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_oracle_decomposition_is_exact(qt: Q) -> None:
    rows, cols = 48, 512
    raw = _q4_k_blocks(rows, cols, 1) if qt == Q.Q4_K else _raw(_weights(rows, cols, 0), qt)
    assert raw.shape[1] * GGML_QUANT_SIZES[qt][0] == cols * GGML_QUANT_SIZES[qt][1]
    w = dequantize(raw, qt)
    p = int4_parts(raw, int(qt), w)
    assert p is not None
    assert p.codes.dtype == torch.uint8 and p.codes.shape == (rows, cols) and int(p.codes.max()) <= 15
    assert p.scale.shape == p.zero.shape == (rows, cols // 32)
    np.testing.assert_allclose(_reconstruct(p), w, rtol=0, atol=1e-6 * float(np.abs(w).max()))
    if qt == Q.Q4_1:  # the stored nibbles themselves: byte j of a block holds elements j (low) and j + 16 (high)
        nib = raw.reshape(rows, -1, 20)[..., 4:]
        want = np.concatenate([nib & 15, nib >> 4], axis=-1).reshape(rows, cols)
        nonzero = np.repeat(p.scale.numpy() != 0, 32, axis=1)
        np.testing.assert_array_equal(p.codes.numpy()[nonzero], want[nonzero])


@pytest.mark.parametrize("qt", [Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.F32])
def test_oracle_refuses_other_formats(qt: Q) -> None:
    a = _weights(32, 256, 2)
    raw = _raw(a, qt) if qt != Q.F32 else a.view(np.uint8)
    assert int4_parts(raw, int(qt), dequantize(raw, qt).reshape(a.shape)) is None


def test_oracle_refuses_weights_off_the_grid() -> None:
    raw = _raw(_weights(32, 256, 3), Q.Q4_1)
    w = dequantize(raw, Q.Q4_1).copy()
    w[5, 40] += 1e-3 * float(np.abs(w).max())  # not s * q + z any more
    assert int4_parts(raw, int(Q.Q4_1), w) is None


def _parts(rows: int, cols: int, seed: int) -> tuple[Int4Parts, torch.Tensor]:
    raw = _raw(_weights(rows, cols, seed) * 0.02, Q.Q4_1)
    w = dequantize(raw, Q.Q4_1)
    p = int4_parts(raw, int(Q.Q4_1), w)
    assert p is not None
    return p, torch.from_numpy(w)


@needs_kernel
@pytest.mark.parametrize("k", [64, 576])
@pytest.mark.parametrize("m", [1, 3, INT4_MAX_ROWS])
def test_packed_linear_matches_dense(k: int, m: int) -> None:
    n = 96
    p, w = _parts(n, k, k + m)
    packed = pack(p)
    assert packed is not None
    torch.manual_seed(m)
    x = torch.randn(m, k).bfloat16()
    bias = torch.randn(n).bfloat16()
    got = linear(x, w.bfloat16(), packed, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n) and torch.isfinite(got).all()
    want = F.linear(x.float(), w, bias.float())  # the float32 weights
    # The kernel's weights are (q - 8) * bf16(s) + bf16(z + 8 s), each within 2^-9 (8 |s| + |z + 8 s|) of w;
    # its output and the bias add round to bf16 (2^-9 each). The dense bf16 weights are within 2^-9 |w|.
    slack = ((8 * p.scale.abs() + (p.zero + 8 * p.scale).abs()) * 2**-9).repeat_interleave(32, 1)
    bound = x.float().abs() @ slack.T + 2**-8 * (want.abs() + bias.float().abs())
    assert ((got.float() - want).abs() <= bound).all()
    dense = F.linear(x, w.bfloat16(), bias).float()
    dense_bound = 2**-9 * (x.float().abs() @ w.abs().T) + 2**-8 * (want.abs() + bias.float().abs())
    assert ((dense - want).abs() <= dense_bound).all()  # the dense path, for scale


@needs_kernel
def test_linear_is_dense_above_the_threshold_and_without_a_packed_weight() -> None:
    p, w = _parts(48, 64, 7)
    packed = pack(p)
    x = torch.randn(INT4_MAX_ROWS + 1, 64).bfloat16()
    assert torch.equal(linear(x, w.bfloat16(), packed), F.linear(x, w.bfloat16()))
    assert torch.equal(linear(x[:2], w.bfloat16(), None), F.linear(x[:2], w.bfloat16()))
    p40, _ = _parts(40, 64, 8)
    assert pack(p40) is None  # the kernel takes N in multiples of 16 only


@needs_kernel
def test_packed_linear_takes_any_layout_of_x() -> None:
    p, w = _parts(48, 64, 9)
    packed = pack(p)
    x = torch.randn(64, 6).bfloat16().T  # [6, 64], not contiguous
    want = linear(x.contiguous(), w.bfloat16(), packed)
    assert torch.equal(linear(x, w.bfloat16(), packed), want)
    assert torch.equal(linear(x.reshape(2, 3, 64), w.bfloat16(), packed), want.view(2, 3, 48))


@needs_int8
@pytest.mark.parametrize("m", [1, 3, INT8_MAX_ROWS])
def test_int8_linear_matches_dense(m: int) -> None:
    n, k = 200, 576
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) * 3)  # rows of different ranges
    w[:, 7] *= 20  # an outlier column
    w[5] = 0  # an all-zero row
    packed = pack_int8(w.bfloat16())
    x = torch.randn(m, k, generator=gen).bfloat16()
    got = linear(x, w.bfloat16(), packed)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n) and torch.isfinite(got).all()
    want = F.linear(x.float(), w.bfloat16().float())
    # each weight within half a step of its row's bf16 scale (the clamp costs no more), the output rounds to bf16
    bound = x.float().abs() @ (0.5 * packed.scales.float()[:, None]).expand(n, k).T + 2**-8 * want.abs() + 1e-4
    assert ((got.float() - want).abs() <= bound).all()
    above = torch.randn(INT8_MAX_ROWS + 1, k, generator=gen).bfloat16()
    assert torch.equal(linear(above, w.bfloat16(), packed), F.linear(above, w.bfloat16()))


@needs_int8
def test_int8_copies_are_kept_until_the_weights_change() -> None:
    cfg = ModelConfig(architecture="llama", vocab_size=160, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, rope_scaling=None, rms_norm_eps=1e-6,
                      max_position_embeddings=32, tie_word_embeddings=True, attention_bias=False, qk_norm=False)
    model = DecoderLM(cfg, FullCausalAttention(4, 2), dtype=torch.bfloat16)
    model.init_random_(seed=3, std=0.1)
    model32 = DecoderLM(cfg, FullCausalAttention(4, 2), dtype=torch.float32)
    ids, pos = torch.tensor([3, 70, 9]), torch.arange(3)  # 3 rows: the int8 paths
    with torch.no_grad():
        for p32, p in zip(model32.parameters(), model.parameters(), strict=True):
            p32.copy_(p.float())
        ref = model32.compute_logits(model32(ids, pos))
        dense = model.compute_logits(model(ids, pos))
        model.pack_int8_weights()
        got = model.compute_logits(model(ids, pos))
    assert model.lm_head_packed is not None
    assert all(sorted(layer.packed) == ["down_weight", "gate_up_weight", "o_weight", "qkv_weight"]
               and all(isinstance(p, PackedInt8) for p in layer.packed.values()) for layer in model.layers)
    # per-row int8 errs about twice as much as bf16 rounding does (measured 0.037 vs 0.017 against float32)
    assert got.dtype == torch.float32 and not torch.equal(got, dense)
    assert (got - ref).abs().max() <= 3 * (dense - ref).abs().max()
    int4 = pack(_parts(2 * 96, 64, 5)[0])
    model.layers[0].packed = {"gate_up_weight": int4}
    model.pack_int8_weights()
    assert model.layers[0].packed["gate_up_weight"] is int4, "an int4 projection stays int4"
    model.load_weights([("model.embed_tokens.weight", torch.zeros(160, 64)),
                        ("model.layers.1.self_attn.o_proj.weight", torch.zeros(64, 64))], strict=False)
    assert model.lm_head_packed is None and "o_weight" not in model.layers[1].packed
    model.init_random_(seed=4)
    assert model.lm_head_packed is None and not any(layer.packed for layer in model.layers)
    model32.pack_int8_weights()
    assert model32.lm_head_packed is None and not any(layer.packed for layer in model32.layers)  # float32: dense


# ---- smollm2-135m (Q4_1): decode with packed weights vs the dense bf16 ones -----------------------------------

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
SMOLLM2 = cache_dir() / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _decode(model: DecoderLM, att: FullCausalAttention, prompt: list[int], steps: int,
            forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """`steps` one-row decode steps after a prefill of `prompt`, greedy or feeding `forced`: the tokens drawn
    greedily and the log-probs [steps, vocab]."""
    att.reset()
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    inp, pos = torch.tensor(prompt), 0
    with torch.no_grad():
        for i in range(steps):
            h = model(inp, torch.arange(pos, pos + len(inp)))
            pos += len(inp)
            logits.append(model.compute_logits(h[-1:]))
            tokens.append(int(logits[-1].argmax()))
            inp = torch.tensor([tokens[-1] if forced is None else forced[i]])
    return tokens, torch.cat(logits).log_softmax(-1)


def _kl_steps(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per step of two [steps, vocab] log-prob tensors."""
    return (ref.exp() * (ref - other)).sum(-1)


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    return float(_kl_steps(ref, other).mean())


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} is not cached")
def test_smollm2_decode_with_int4_weights_stays_close_to_dense() -> None:
    """Decode steps (one row each: the int4 path) forced along float32's greedy continuation, with the packed
    weights and with them dropped, each against the float32 model; and the greedy tokens of both.

    Measured 2026-12-03 over 48 steps: KL(dense || int4) 1.0e-3, KL(fp32 || dense) 6.3e-4, KL(fp32 || int4)
    7.2e-4; greedy int4 and dense agree for 27 tokens. The int4 weights' scales round to bf16, so the two bf16
    paths err differently, each about as far from float32 (on "The capital of France is": 1.9e-3, 1.1e-3, 1.2e-3).
    """
    import tokenizers

    from saw_worker.loader import load_model

    att, att32 = FullCausalAttention(9, 3, cache=True), FullCausalAttention(9, 3, cache=True)
    lm = load_model(str(SMOLLM2), "auto", CPU, torch.bfloat16, att, cpu_blocks=False)
    lm32 = load_model(str(SMOLLM2), "auto", CPU, torch.float32, att32, cpu_blocks=False)
    packed = [dict(layer.packed) for layer in lm.model.layers]
    assert all(sorted(p) == ["down_weight", "gate_up_weight", "o_weight", "qkv_weight"] for p in packed)
    assert not any(layer.packed for layer in lm32.model.layers)
    tok = tokenizers.Tokenizer.from_str(lm.tokenizer.tokenizer_json)
    prompt = tok.encode(PROMPT).ids
    steps = 48
    ref_tokens, ref = _decode(lm32.model, att32, prompt, steps)
    greedy_int4, _ = _decode(lm.model, att, prompt, 16)
    _, int4 = _decode(lm.model, att, prompt, steps, ref_tokens)
    for layer in lm.model.layers:
        layer.packed = {}
    greedy_dense, _ = _decode(lm.model, att, prompt, 16)
    _, dense = _decode(lm.model, att, prompt, steps, ref_tokens)
    assert torch.isfinite(int4).all()
    assert greedy_int4 == greedy_dense
    assert _kl(dense, int4) < 2e-3
    assert _kl(ref, int4) < 1.3 * _kl(ref, dense)


QWEN = cache_dir() / "qwen2.5-coder-0.5b" / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not blocks_supported(CPU, torch.float32), reason="no native matvec (module or AVX2)")
@pytest.mark.parametrize("path", [SMOLLM2, QWEN], ids=["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_decode_on_gguf_blocks_stays_close_to_dense(path: Path) -> None:
    """Decode steps (one row each: the native matvec on the GGUF's blocks, Q8 activations) forced along the dense
    float32 model's greedy continuation, against it; and against the bf16 model with the int4 / int8 copies
    (the CPU path where the blocks are off), which must not be closer.

    Per step KL(dense || path): its median must not exceed the bf16 path's by more than a quarter, and its mean
    stays small. The mean alone is not compared: one near-tie step can set it (a forced token the path gives
    little mass to). Measured 2026-12-06 (Zen 3, AVX2) over 48 steps, mean KL blocks vs bf16 int4/int8:
    smollm2-135m 1.2e-3 vs 2.0e-3, qwen2.5-coder-0.5b 3.2e-5 vs 9.1e-5; greedy on the blocks matches dense in 12 /
    16 of the first tokens (smollm2) and 16 / 16 (qwen). 2026-12-08 (Zen 4 with AVX-512 bf16, torch 2.15, where
    the bf16 path's matmuls are native): smollm2 mean 2.4e-3 vs 1.6e-3, of it one step's 3.9e-2 (the last), medians
    8.2e-4 vs 8.4e-4."""
    import tokenizers

    from saw_worker.loader import load_model

    if not path.exists():
        pytest.skip(f"{path} is not cached")
    heads = {SMOLLM2: (9, 3), QWEN: (14, 2)}[path]
    runs = {}
    for name, dtype, blocks in (("dense", torch.float32, False), ("blocks", torch.float32, True),
                                ("bf16 int4/int8", torch.bfloat16, False)):
        att = FullCausalAttention(*heads, cache=True)
        lm = load_model(str(path), "auto", CPU, dtype, att, cpu_blocks=blocks)
        assert lm.model.native_decode == blocks
        runs[name] = (lm, att)
    tok = tokenizers.Tokenizer.from_str(runs["dense"][0].tokenizer.tokenizer_json)
    prompt = tok.encode(PROMPT).ids
    steps = 48
    ref_tokens, ref = _decode(runs["dense"][0].model, runs["dense"][1], prompt, steps)
    kl = {}
    for name in ("blocks", "bf16 int4/int8"):
        _, logp = _decode(runs[name][0].model, runs[name][1], prompt, steps, ref_tokens)
        assert torch.isfinite(logp).all()
        kl[name] = _kl_steps(ref, logp)
    print({name: (f"mean {float(k.mean()):.2e}", f"median {float(k.median()):.2e}") for name, k in kl.items()})
    assert kl["blocks"].median() <= 1.25 * kl["bf16 int4/int8"].median()
    assert kl["blocks"].mean() < 4e-3
