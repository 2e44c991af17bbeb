"""The native matvec on GGUF blocks (models/linear.py on cpu-kernels/src/quant.rs) against float64: gguf's own
dequantizer for the weights (random blocks of every type the kernel reads), the kernel's Q8 rounding of the
activations redone in float32 here; row counts that split unevenly over the threads, 1 to 9 activation rows
(the kernel takes them 4 at a time), weights stacked from segments of different types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

from saw_worker.models.linear import BLOCK_TYPES, BLOCKS_MAX_ROWS, blocks_supported, linear, pack_blocks

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not blocks_supported(CPU, torch.float32),
                                reason="saw_router._native is not built or the CPU lacks AVX2")
TYPES = [Q(t) for t in sorted(BLOCK_TYPES)]
# where each type keeps its fp16 scale (and min): the rest of a block is codes and sub-block scales, any bytes valid
F16_AT = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(qtype: Q, rows: int, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks [rows, bytes per row] of `qtype` and their float64 dequantization [rows, k]."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        scale = (rng.standard_normal(len(raw)) * 0.01).astype(np.float16)
        raw[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(rows, -1)
    w = np.asarray(dequantize(raw, qtype), dtype=np.float64).reshape(rows, k)
    return torch.from_numpy(raw), torch.from_numpy(w)


def q8(x: torch.Tensor) -> torch.Tensor:
    """The kernel's activation rows in float64: per block of 32, scale = max |x| / 127 and codes rounded half-even
    from x * (1 / scale), in float32."""
    b = x.float().reshape(-1, 32)
    scale = b.abs().amax(1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(b * inv).double() * scale.double()).reshape(x.shape)


def check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got = q8(x) @ w.T to float32 rounding of its terms, plus the output dtype's half ulp."""
    xq = q8(x)
    want = xq @ w.T
    bound = 1e-6 * (xq.abs() @ w.abs().T) + (2.0**-8 if got.dtype == torch.bfloat16 else 0) * want.abs() + 1e-30
    err = (got.double() - want).abs()
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, at {(err > bound).nonzero()[0].tolist()}"


def activations(m: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    x[:, 3] *= 40  # an outlier channel sets its block's scale
    x[:, 32:64] = 0  # an all-zero block (scale 0)
    return x.to(dtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 4, 5, BLOCKS_MAX_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_matches_float64(qtype: Q, m: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(int(qtype) * 10 + m)
    gen = torch.Generator().manual_seed(m)
    rows, k = 37, 512  # 37 rows: no even split over 2 or 4 threads
    raw, w = random_blocks(qtype, rows, k, rng)
    x = activations(m, k, gen, dtype)
    packed = pack_blocks([(int(qtype), raw)], k)
    got = linear(x, w.to(dtype), packed)
    assert got.dtype == dtype
    check(got, x, w)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("rows", [(7, 1, 130), (130, 1, 7)])  # a thread's rows end inside, before a segment
def test_stacked_segments_and_threads(threads: int, rows: tuple[int, int, int]) -> None:
    """q | k | v of three types in one call, at shapes a thread split leaves uneven (1 and 7 rows); every row is
    one thread's, so the thread count changes no bit."""
    rng = np.random.default_rng(7)
    gen = torch.Generator().manual_seed(7)
    k = 768
    types = (Q.Q5_0, Q.Q6_K, Q.Q8_0)
    parts = [random_blocks(t, r, k, rng) for t, r in zip(types, rows, strict=True)]
    w = torch.cat([p[1] for p in parts])
    segments = [(int(t), p[0]) for t, p in zip(types, parts, strict=True)]
    packed = pack_blocks(segments, k)
    packed.fields["threads"] = threads
    x = activations(3, k, gen, torch.float32)
    got = linear(x, w.float(), packed)
    check(got, x, w)
    packed.fields["threads"] = 1
    assert torch.equal(got, linear(x, w.float(), packed))


def test_more_rows_than_the_kernel_takes_run_dense() -> None:
    rng = np.random.default_rng(3)
    raw, w = random_blocks(Q.Q4_K, 16, 256, rng)
    x = torch.randn(BLOCKS_MAX_ROWS + 1, 256)
    assert torch.equal(linear(x, w.float(), pack_blocks([(int(Q.Q4_K), raw)], 256)), x @ w.float().T)


def test_bad_shapes_raise() -> None:
    rng = np.random.default_rng(4)
    raw, w = random_blocks(Q.Q8_0, 4, 64, rng)
    with pytest.raises(ValueError, match="bytes for 4 rows"):
        linear(torch.randn(1, 96), w.float(), pack_blocks([(int(Q.Q8_0), raw)], 96))
