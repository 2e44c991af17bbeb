"""Fused q/k norm + RoPE, SiLU-and-mul and add + RMSNorm against the torch path (F.rms_norm, apply_rope, F.silu)
in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kref import DEV, ref_qk, tiny_decoder

from saw_kernels import add_rms_norm, fused, qk_norm_rope, silu_mul
from saw_worker.models import decoder
from saw_worker.models.rope import cos_sin_cache

MAX_POS = 300
EPS = 1e-6
# fp32 math, one rounding to the output dtype: half an ulp relative (a whole ulp under the CPU interpreter,
# which truncates to bf16), plus fp32 noise against the row scale
RTOL = {torch.bfloat16: 2.0**-8 if DEV.type == "cuda" else 2.0**-7, torch.float32: 1e-5}

# GQA (Hq, Hkv): MHA, small group, one KV head, the Qwen3-8B/Llama-8B ratio scaled down (32/8 -> 12/3)
HEADS = [(1, 1), (4, 2), (8, 1), (12, 3)]


def rand_rows(t: int, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """[T, n] with a few large outlier channels (what the qkv / gate_up GEMM outputs look like)."""
    x = torch.randn(t, n, generator=gen, dtype=torch.float64)
    ch = torch.randperm(n, generator=gen)[: max(2, n // 40)]
    x[:, ch] = x[:, ch] * 8 + 5
    return x.to(DEV, dtype)


def assert_close_rows(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.is_contiguous() and not torch.isnan(got).any()
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    err = (got.double() - ref).abs()
    bad = err > RTOL[dtype] * ref.abs() + 1e-6 * scale
    assert not bad.any(), f"max err {err.max().item():.3g} at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"q{h[0]}kv{h[1]}")
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "kscale"])
def test_qk_norm_rope_matches_reference(t: int, d: int, heads: tuple[int, int], norm: bool, scaled: bool) -> None:
    hq, hkv = heads
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(t * 1000 + d + 10 * hq + hkv + norm)
    qkv = rand_rows(t, (hq + 2 * hkv) * d, gen, dtype)
    qw = kw = None
    if norm:  # HF norm weights are near 1, with a few large ones
        qw = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEV, dtype)
        kw = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEV, dtype)
        kw[3] = 12.0
    cache = cos_sin_cache(d, 1e6, None, MAX_POS, DEV)
    pos = torch.randint(0, MAX_POS, (2 * t,), generator=gen).to(DEV)[::2]  # non-contiguous, unordered
    pos[0] = MAX_POS - 1
    # the K scale of a KV format: powers of two per (KV head, channel), above and below 1
    lam = torch.exp2(torch.randint(-3, 4, (hkv, d), generator=gen).float()).to(DEV) if scaled else None
    q, k = qk_norm_rope(qkv, hq, hkv, d, qw, kw, EPS, cache, pos, lam)
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d)
    rq, rk = ref_qk(qkv, hq, hkv, d, qw, kw, cache, pos, lam)
    assert_close_rows(q, rq, dtype)
    assert_close_rows(k, rk, dtype)


def test_qk_norm_rope_fp32_strided_input() -> None:
    """fp32 to fp32 accuracy, from a qkv view with padded rows (row stride > width)."""
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, t = 4, 2, 64, 9
    wide = rand_rows(t, (hq + 2 * hkv) * d + 16, gen, torch.float32)
    qkv = wide[:, : (hq + 2 * hkv) * d]
    qw = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEV)
    kw = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEV)
    cache = cos_sin_cache(d, 1e4, None, MAX_POS, DEV)
    pos = torch.randint(0, MAX_POS, (t,), generator=gen).to(DEV)
    q, k = qk_norm_rope(qkv, hq, hkv, d, qw, kw, EPS, cache, pos)
    rq, rk = ref_qk(qkv, hq, hkv, d, qw, kw, cache, pos)
    assert_close_rows(q, rq, torch.float32)
    assert_close_rows(k, rk, torch.float32)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("inter", [64, 192, 1500])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(100) = inf in the interpreter, as on GPU
def test_silu_mul_matches_reference(t: int, inter: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(t + inter)
    x = rand_rows(t, 2 * inter, gen, dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, -30.0, 0.0], dtype=dtype)  # saturated sigmoid, exact zero
    out = silu_mul(x)
    assert out.shape == (t, inter)
    g, u = x.double().chunk(2, dim=-1)
    assert_close_rows(out, F.silu(g) * u, dtype)


def test_empty_batch() -> None:
    cache = cos_sin_cache(64, 1e4, None, 8, DEV)
    q, k = qk_norm_rope(torch.empty(0, 4 * 64, device=DEV), 2, 1, 64, None, None, EPS, cache,
                        torch.empty(0, dtype=torch.int64, device=DEV))
    assert q.shape == (0, 2, 64) and k.shape == (0, 1, 64)
    assert silu_mul(torch.empty(0, 8, device=DEV)).shape == (0, 4)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_decoder_fused_path_matches_torch_path(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DecoderLM with the switch forced to the Triton kernels (under the interpreter on CPU) equals the torch path in
    fp32."""
    model, gen = tiny_decoder(arch, torch.float32, DEV)
    ids = torch.randint(0, model.config.vocab_size, (9,), generator=gen).to(DEV)
    pos = torch.arange(20, 29, device=DEV)
    with torch.no_grad():
        monkeypatch.setattr(decoder, "fused_ops", lambda x: None)
        want = model(ids, pos)
        monkeypatch.setattr(decoder, "fused_ops", lambda x: fused)
        got = model(ids, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_qwen3_8b_shapes_cuda_graph() -> None:
    """Full Qwen3-8B shapes at decode batch 64, launched inside a captured CUDA graph."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, t, inter = 32, 8, 128, 64, 12288
    qkv = rand_rows(t, (hq + 2 * hkv) * d, gen, torch.bfloat16)
    gate_up = rand_rows(t, 2 * inter, gen, torch.bfloat16)
    x, residual = rand_rows(t, 4096, gen, torch.bfloat16), rand_rows(t, 4096, gen, torch.bfloat16)
    norm_w = (1 + 0.3 * torch.randn(4096, generator=gen)).to(DEV, torch.bfloat16)
    qw = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEV, torch.bfloat16)
    kw = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEV, torch.bfloat16)
    cache = cos_sin_cache(d, 1e6, None, 40960, DEV)
    pos = torch.randint(0, 40960, (t,), generator=gen).to(DEV)
    qk_norm_rope(qkv, hq, hkv, d, qw, kw, EPS, cache, pos)  # compile outside the capture
    silu_mul(gate_up)
    add_rms_norm(x, residual, norm_w, EPS)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, k = qk_norm_rope(qkv, hq, hkv, d, qw, kw, EPS, cache, pos)
        out = silu_mul(gate_up)
        normed, stream = add_rms_norm(x, residual, norm_w, EPS)
    qkv.copy_(rand_rows(t, (hq + 2 * hkv) * d, gen, torch.bfloat16))  # replay reads the new inputs
    pos.copy_(torch.randint(0, 40960, (t,), generator=gen).to(DEV))
    residual.copy_(rand_rows(t, 4096, gen, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    rq, rk = ref_qk(qkv, hq, hkv, d, qw, kw, cache, pos)
    assert_close_rows(q, rq, torch.bfloat16)
    assert_close_rows(k, rk, torch.bfloat16)
    g, u = gate_up.double().chunk(2, dim=-1)
    assert_close_rows(out, F.silu(g) * u, torch.bfloat16)
    assert torch.equal(stream, x + residual)
    assert_close_rows(normed, F.rms_norm(stream.double(), (4096,), norm_w.double(), EPS), torch.bfloat16)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("hidden", [64, 576, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_matches_reference(t: int, hidden: int, dtype: torch.dtype) -> None:
    """The stream equals the unfused add bit for bit; the norm is F.rms_norm of that stream, in float64."""
    gen = torch.Generator().manual_seed(t * 7 + hidden)
    x = rand_rows(t, hidden, gen, dtype)
    residual = rand_rows(t, hidden, gen, dtype) * 30  # the stream is much larger than a block's output
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(DEV, dtype)
    weight[1] = 9.0
    out, stream = add_rms_norm(x, residual, weight, EPS)
    if DEV.type == "cuda" or dtype == torch.float32:
        assert torch.equal(stream, x + residual)
    else:  # the CPU interpreter truncates fp32 -> bf16 instead of rounding
        assert_close_rows(stream, x.double() + residual.double(), dtype)
    assert_close_rows(out, F.rms_norm(stream.double(), (hidden,), weight.double(), EPS), dtype)


def test_add_rms_norm_strided_and_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(3)
    wide = rand_rows(5, 80, gen, torch.float32)
    x, residual = wide[:, :64], rand_rows(5, 64, gen, torch.float32)
    weight = torch.ones(64, device=DEV)
    out, stream = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(stream, x + residual)
    assert_close_rows(out, F.rms_norm(stream.double(), (64,), weight.double(), EPS), torch.float32)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, residual[:, :32], weight, EPS)
    empty = torch.empty(0, 64, device=DEV)
    assert add_rms_norm(empty, empty, weight, EPS)[0].shape == (0, 64)
