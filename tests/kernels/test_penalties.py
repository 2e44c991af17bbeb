"""The sampler's fused bias + penalties kernel against its torch twin, computed in float64."""

from __future__ import annotations

import pytest
import torch
from kref import DEV

from saw_kernels.penalties import BLOCK, penalize
from saw_worker.engine.penalties import penalize_reference

POISON = 1e30  # rows outside the launch keep it exactly


def table(rows: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random state: sparse counts, prompt marks, bias everywhere (used only where has_bias), mixed options
    (repetition 1 on some rows: their prompt marks must not matter)."""
    counts = torch.randint(0, 4, (rows, vocab), generator=gen, dtype=torch.int32)
    counts[torch.rand(rows, vocab, generator=gen) < 0.9] = 0
    in_prompt = (torch.rand(rows, vocab, generator=gen) < 0.05).to(torch.uint8)
    bias = torch.randn(rows, vocab, generator=gen) * 10
    params = torch.stack([torch.rand(rows, generator=gen) * 4 - 2, torch.rand(rows, generator=gen) * 4 - 2,
                          torch.where(torch.arange(rows) % 3 == 0, 1.0, torch.rand(rows, generator=gen) * 1.9 + 0.1),
                          (torch.arange(rows) % 2).float()], -1)
    return tuple(t.to(DEV) for t in (counts, in_prompt, bias, params))


@pytest.mark.parametrize(("batch", "vocab", "picked"), [
    (1, 1, [0]),  # one token, one row
    (3, BLOCK, [2, 0]),  # a whole block, rows out of order
    (5, 2 * BLOCK + 1, [4, 1, 3]),  # one token past a block
    (8, 1000, list(range(8))),  # every row
])
def test_penalize_matches_the_torch_reference(batch: int, vocab: int, picked: list[int]) -> None:
    gen = torch.Generator().manual_seed(batch * vocab)
    state = table(8, vocab, gen)
    logits = torch.randn(batch, vocab, generator=gen) * 5
    logits[:, : max(1, vocab // 50)] *= 20  # outlier logits
    outside = [b for b in range(batch) if b not in picked]
    logits[outside] = POISON
    batch_rows = torch.tensor(picked, dtype=torch.int32, device=DEV)
    table_rows = torch.randperm(8, generator=gen)[: len(picked)].to(torch.int32).to(DEV)
    want = logits.double().to(DEV)
    penalize_reference(want, batch_rows, table_rows, *(t.double() if t.is_floating_point() else t for t in state))
    got = logits.to(DEV)
    penalize(got, batch_rows, table_rows, *state)
    assert torch.equal(got[outside], logits[outside].to(DEV))
    err = (got.double() - want).abs()
    assert err.max() <= 1e-5 * want.abs().max(), f"max err {err.max().item():.3g}"


@pytest.mark.gpu
def test_penalize_at_a_large_batch_and_vocabulary() -> None:
    """Qwen3's vocabulary, 256 rows of which every other is penalized."""
    gen = torch.Generator().manual_seed(0)
    vocab = 151936
    state = table(256, vocab, gen)
    logits = (torch.randn(256, vocab, generator=gen) * 5).to(DEV)
    rows = torch.arange(0, 256, 2, dtype=torch.int32, device=DEV)
    want = logits.double()
    penalize_reference(want, rows, rows, *(t.double() if t.is_floating_point() else t for t in state))
    penalize(logits, rows, rows, *state)
    assert ((logits.double() - want).abs() <= 1e-5 * want.abs().max()).all()
