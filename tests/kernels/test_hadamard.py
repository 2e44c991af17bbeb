"""Standalone Hadamard against formats.rotate in float64 (and fast_hadamard_transform on CUDA when present)."""

from __future__ import annotations

import pytest
import torch
from kref import DEV, rel_err

from saw_kernels import fast_hadamard_available, hadamard
from saw_kv.formats import HADAMARD_ORDERS, rotate

CASES = [(d, b) for d in (64, 128) for b in HADAMARD_ORDERS if b <= d]


@pytest.mark.parametrize("d,order", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3), (torch.float16, 1e-3)])
def test_hadamard_matches_reference(d: int, order: int, dtype: torch.dtype, tol: float) -> None:
    x = torch.randn(5, 7, d, dtype=torch.float64)
    x[..., 3] += 20  # an outlier channel
    xd = x.to(DEV, dtype)
    y = hadamard(xd, order, use_fht=False)
    assert y.shape == xd.shape and y.dtype == dtype
    assert rel_err(y, rotate(xd.double(), order)) < tol


def test_hadamard_is_an_involution() -> None:
    x = torch.randn(33, 128, device=DEV)
    torch.testing.assert_close(hadamard(hadamard(x, 32), 32), x, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not fast_hadamard_available(), reason="fast_hadamard_transform not installed")
def test_hadamard_agrees_with_fast_hadamard_transform() -> None:
    x = torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    for order in HADAMARD_ORDERS:
        ours, theirs = hadamard(x, order, use_fht=False), hadamard(x, order, use_fht=True)
        assert rel_err(ours, theirs.double()) < 1e-2
