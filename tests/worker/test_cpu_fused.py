"""The native CPU fused ops (models/cpu_fused.py on cpu-kernels/src/fused.rs) against the decoder's torch path
(F.rms_norm, rope.apply_rope, F.silu) in float64, with fresh random inputs and outlier channels; the decoder's
greedy tokens with them equal its tokens on the torch path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kref import ref_qk, tiny_decoder  # noqa: E402

from saw_worker.models import DecoderLM, FullCausalAttention, cpu_fused, decoder
from saw_worker.models.rope import cos_sin_cache
from saw_worker.native import tensor

pytestmark = pytest.mark.skipif(not cpu_fused.available(), reason="saw_router._native is not built")

EPS = 1e-6
MAX_POS = 300
# fp32 math, one rounding to the output dtype: half an ulp relative, plus fp32 noise against the row scale
RTOL = {torch.bfloat16: 2.0**-8, torch.float32: 1e-5}
DTYPES = [torch.bfloat16, torch.float32]
# (Hq, Hkv): MHA, GQA, one KV head, smollm2-135m's 9 / 3
HEADS = [(1, 1), (4, 2), (8, 1), (9, 3)]


def rand_rows(t: int, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """[T, n] with a few large outlier channels (what the GEMM outputs look like)."""
    x = torch.randn(t, n, generator=gen, dtype=torch.float64)
    ch = torch.randperm(n, generator=gen)[: max(2, n // 40)]
    x[:, ch] = x[:, ch] * 8 + 5
    return x.to(dtype)


def norm_weight(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """HF norm weights: near 1, with a large one."""
    w = (1 + 0.3 * torch.randn(n, generator=gen)).to(dtype)
    w[1] = 9.0
    return w


def assert_close_rows(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and not torch.isnan(got).any()
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    err = (got.double() - ref).abs()
    bad = err > RTOL[dtype] * ref.abs() + 1e-6 * scale
    assert not bad.any(), f"max err {err.max().item():.3g} at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hidden", [(1, 64), (3, 576), (5, 100), (300, 576)])  # the last split over threads
def test_rms_norm_and_add_rms_norm_match_torch(t: int, hidden: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(t * 7 + hidden)
    x = rand_rows(t, hidden, gen, dtype)
    residual = rand_rows(t, hidden, gen, dtype) * 30  # the stream is much larger than a block's output
    weight = norm_weight(hidden, gen, dtype)
    assert_close_rows(cpu_fused.rms_norm(x, weight, EPS), F.rms_norm(x.double(), (hidden,), weight.double(), EPS),
                      dtype)
    want_stream = x + residual
    xs, rs = x.clone(), residual.clone()
    normed, stream = cpu_fused.add_rms_norm(xs, rs, weight, EPS)
    assert normed.data_ptr() == xs.data_ptr() and stream.data_ptr() == rs.data_ptr(), "in place"
    assert torch.equal(stream, want_stream), "the stream is the unfused add, bit for bit"
    assert_close_rows(normed, F.rms_norm(want_stream.double(), (hidden,), weight.double(), EPS), dtype)


def test_rms_norm_of_per_head_rows() -> None:
    """RMSNorm.forward's other shape: [T, H, D] (q_norm / k_norm on the torch path)."""
    gen = torch.Generator().manual_seed(1)
    x = rand_rows(6, 4 * 64, gen, torch.bfloat16).view(6, 4, 64)
    w = norm_weight(64, gen, torch.bfloat16)
    assert_close_rows(cpu_fused.rms_norm(x, w, EPS), F.rms_norm(x.double(), (64,), w.double(), EPS), torch.bfloat16)




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 300])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("norm,scaled", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain", "norm", "kscale", "norm-kscale"])
def test_qk_norm_rope_matches_torch(dtype: torch.dtype, t: int, d: int, heads: tuple[int, int], norm: bool,
                                    scaled: bool) -> None:
    hq, hkv = heads
    gen = torch.Generator().manual_seed(t * 1000 + d + 10 * hq + hkv + 2 * norm + scaled)
    qkv = rand_rows(t, (hq + 2 * hkv) * d, gen, dtype)
    qw = norm_weight(d, gen, dtype) if norm else None
    kw = norm_weight(d, gen, dtype) if norm else None
    cache = cos_sin_cache(d, 1e6, None, MAX_POS)
    pos = torch.randint(0, MAX_POS, (t,), generator=gen)
    pos[0] = MAX_POS - 1
    # the K scale of a KV format: powers of two per (KV head, channel), above and below 1
    lam = torch.exp2(torch.randint(-3, 4, (hkv, d), generator=gen).float()) if scaled else None
    before = qkv.clone()
    rq, rk = ref_qk(qkv, hq, hkv, d, qw, kw, cache, pos, lam)
    q, k = cpu_fused.qk_norm_rope(qkv, hq, hkv, d, qw, kw, EPS, cache, pos, lam)
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d)
    assert q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv.data_ptr() + hq * d * qkv.element_size()
    assert_close_rows(q, rq, dtype)
    assert_close_rows(k, rk, dtype)
    assert torch.equal(qkv[:, (hq + hkv) * d:], before[:, (hq + hkv) * d:]), "v is not touched"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 64), (7, 1536), (4, 100), (300, 1536)])
def test_silu_mul_matches_torch(t: int, inter: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(t + inter)
    x = rand_rows(t, 2 * inter, gen, dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 0.0], dtype=dtype)  # saturated sigmoid, exact zero
    out = cpu_fused.silu_mul(x)
    assert out.shape == (t, inter)
    g, u = x.double().chunk(2, dim=-1)
    assert_close_rows(out, F.silu(g) * u, dtype)


def test_outputs_are_written_whole_and_nothing_past_them() -> None:
    """The native ops on NaN-poisoned outputs inside a larger poisoned buffer: every output element is written,
    none around it."""
    gen = torch.Generator().manual_seed(2)
    t, hidden, inter = 3, 96, 80
    x, w = rand_rows(t, hidden, gen, torch.bfloat16), norm_weight(hidden, gen, torch.bfloat16)
    gate_up = rand_rows(t, 2 * inter, gen, torch.bfloat16)
    for n, call in [(t * hidden, lambda out: cpu_fused._rms_norm(  # noqa: SLF001
                        {**tensor("x", x, x.dtype), **tensor("weight", w, x.dtype),
                         **tensor("out", out, x.dtype), **cpu_fused._common(x)}, EPS)),  # noqa: SLF001
                    (t * inter, lambda out: cpu_fused._silu_mul(  # noqa: SLF001
                        {**tensor("gate_up", gate_up, x.dtype), **tensor("out", out, x.dtype),
                         "inter": inter, **cpu_fused._common(x)}))]:  # noqa: SLF001
        buf = torch.full((n + 64,), float("nan"), dtype=torch.bfloat16)
        call(buf[32 : 32 + n])
        assert not buf[32 : 32 + n].isnan().any() and buf[:32].isnan().all() and buf[32 + n :].isnan().all()


def test_bad_layouts_are_errors() -> None:
    gen = torch.Generator().manual_seed(3)
    x = rand_rows(4, 64, gen, torch.bfloat16)
    w = norm_weight(64, gen, torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_fused.add_rms_norm(rand_rows(4, 128, gen, torch.bfloat16)[:, :64], x.clone(), w, EPS)
    with pytest.raises(ValueError, match="contiguous CPU torch.bfloat16"):
        cpu_fused.rms_norm(x, w.float(), EPS)  # weight of another dtype
    with pytest.raises(ValueError, match="rows of 48"):
        cpu_fused.rms_norm(x, w[:48], EPS)  # the Rust side: not whole rows
    with pytest.raises(ValueError, match="bf16 or fp32"):
        cpu_fused.silu_mul(x.half())
    cache = cos_sin_cache(64, 1e4, None, 16)
    qkv = rand_rows(2, 4 * 64, gen, torch.bfloat16)
    with pytest.raises(ValueError, match="position"):
        cpu_fused.qk_norm_rope(qkv, 2, 1, 64, None, None, EPS, cache, torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="heads"):
        cpu_fused.qk_norm_rope(qkv, 3, 1, 64, None, None, EPS, cache, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="positions"):
        cpu_fused.qk_norm_rope(qkv, 2, 1, 64, None, None, EPS, cache, torch.tensor([3]))
    with pytest.raises(ValueError, match="torch.int64"):
        cpu_fused.qk_norm_rope(qkv, 2, 1, 64, None, None, EPS, cache, torch.tensor([3, 4], dtype=torch.int32))


def tiny_model(arch: str, dtype: torch.dtype) -> DecoderLM:
    model, gen = tiny_decoder(arch, dtype, cache=True)
    if arch == "llama":  # a KV format's K scale on one layer
        model.layers[1].k_scale = torch.exp2(torch.randint(-2, 3, (2, 32), generator=gen).float())
    return model


def step_logits(model: DecoderLM, prompt: list[int], steps: int, forced: list[int] | None = None
                ) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding: the prefill, then one token a step (the decode path: single rows). Returns the tokens and
    each step's logits [steps, V]; with `forced`, each step is fed those tokens instead of its own."""
    attention = model.attention
    assert isinstance(attention, FullCausalAttention)
    attention.reset()
    ids, pos = torch.tensor(prompt), torch.arange(len(prompt))
    tokens, logits = [], []
    with torch.inference_mode():
        for i in range(steps):
            logits.append(model.compute_logits(model(ids, pos)[-1:])[0])
            tokens.append(int(logits[-1].argmax()))
            ids, pos = torch.tensor([(forced or tokens)[i]]), pos[-1:] + 1
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_decoder_greedy_tokens_equal_the_torch_path(arch: str, dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32: the same greedy tokens. bf16, where the torch path rounds more often (bf16 cos / sin, a rounding
    per op): fed the torch path's tokens, the fused path picks the same ones except at near-ties (a top-2 gap
    within the two paths' logit difference), and at nearly all steps."""
    model = tiny_model(arch, dtype)
    prompt = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    steps = 24
    assert decoder.fused_ops(torch.empty(1)) is cpu_fused, "the CPU default with the native module"
    fused, _ = step_logits(model, prompt, steps)
    with monkeypatch.context() as m:
        m.setattr(decoder, "fused_ops", lambda x: None)
        want, ref = step_logits(model, prompt, steps)
    if dtype == torch.float32:
        assert fused == want
        return
    got, logits = step_logits(model, prompt, steps, forced=want)
    diff = (logits - ref).abs().amax(-1)
    assert diff.max() < 0.05 * ref.abs().amax()
    top2 = ref.topk(2, dim=-1).values
    near_tie = top2[:, 0] - top2[:, 1] <= 2 * diff
    assert all(g == w or tie for g, w, tie in zip(got, want, near_tie.tolist(), strict=True))
    assert sum(g == w for g, w in zip(got, want, strict=True)) >= steps * 7 // 8
