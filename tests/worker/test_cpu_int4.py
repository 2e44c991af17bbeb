"""The CPU path's C++ products with INT4 rows (kv/cpu_int4.cpp) against the reference's torch ones, which define
them: fresh random codes, params (outliers included) and queries, gathered at random slots, edge shapes."""

from __future__ import annotations

import pytest
import torch

from saw_worker.kv import cpu_int4
from saw_worker.kv.reference import TORCH_INT4

CPP = cpu_int4.products()
pytestmark = pytest.mark.skipif(CPP is TORCH_INT4, reason="the C++ extension could not be built here")


def tables(slots: int, hkv: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 256, (slots, hkv, d // 2), dtype=torch.uint8, generator=gen)
    scale = torch.rand(slots, hkv, generator=gen) * 0.1
    scale[::7] *= 50  # outlier rows
    lo = torch.randn(slots, hkv, generator=gen)
    return codes, torch.stack([scale, lo], -1).to(torch.float16)


# (requests, KV heads, query rows per head, positions, head_dim): 1 token, one row, GQA up to 8 x 2 queries
SHAPES = [(1, 1, 1, 1, 64), (1, 3, 3, 37, 64), (2, 2, 8, 100, 128), (3, 8, 16, 257, 128), (4, 2, 1, 5, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_products_match_torch(shape: tuple[int, ...]) -> None:
    b, hkv, n, length, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    codes, params = tables(length * b + 11, hkv, d, gen)
    slots = torch.randint(0, codes.shape[0], (b, length), generator=gen)
    q = torch.randn(b, hkv, n, d, generator=gen) * 3
    want = TORCH_INT4.scores(q, codes, params, slots)
    got = CPP.scores(q, codes, params, slots)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    probs = torch.softmax(want, -1)
    probs[..., ::3] = 0.0  # rows the window reads at bf16 carry no weight here
    want_o = TORCH_INT4.weighted(probs, codes, params, slots)
    got_o = CPP.weighted(probs, codes, params, slots)
    torch.testing.assert_close(got_o, want_o, rtol=1e-5, atol=1e-5 * want_o.abs().max().item())


def test_cpp_products_refuse_wrong_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    codes, params = tables(8, 2, 64, gen)
    slots = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="fp32"):
        CPP.scores(torch.zeros(1, 2, 1, 64, dtype=torch.float64), codes, params, slots)
    with pytest.raises(RuntimeError, match="slots"):
        CPP.scores(torch.zeros(1, 2, 1, 64), codes, params, slots.int())
