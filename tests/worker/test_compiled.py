"""The compiled CPU decode forward (models/compiled.py) against the eager one, on a tiny bf16 model with packed int4
projections and fresh random weights and prompts: the same hidden states within bf16 tolerance, for 1 and 3 rows
rows, every KV format, the window's INT4 reads included; after the warm-up no step compiles again."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_util import TINY, prompt

from saw_kv.formats import KVFormat
from saw_worker.builder import attention_backend
from saw_worker.engine.model_runner import ModelRunner, host_batch
from saw_worker.engine.request import GenerateParams, Sequence
from saw_worker.engine.scheduler import Batch, Chunk
from saw_worker.kv.pool import KVPool
from saw_worker.models import DecoderLM, FullCausalAttention, compiled
from saw_worker.models.linear import Int4Parts, int4_supported, pack

pytestmark = pytest.mark.skipif(not int4_supported(torch.device("cpu"), torch.bfloat16),
                                reason="torch has no int4 CPU kernel")

PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


def _packed_model(backend: object, seed: int) -> DecoderLM:
    """TINY in bf16 with random weights; each projection also packed from random int4 parts (what decode reads)."""
    model = DecoderLM(TINY, backend, dtype=torch.bfloat16)  # type: ignore[arg-type]
    model.init_random_(seed=seed, std=0.3)
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for name in PROJECTIONS:
            n, k = layer.get_parameter(name).shape
            scale = (0.5 + torch.rand(n, k // 32, generator=g)) / (4.6 * k**0.5)  # weights of std ~ 1 / sqrt(k)
            parts = Int4Parts(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), scale, -7.5 * scale)
            packed = pack(parts)
            assert packed is not None
            layer.packed[name] = packed
    return model


def _snapshot(pool: KVPool) -> list[torch.Tensor]:
    """Every cache tensor the step may write, cloned (a step rewrites its slots and its ring entries)."""
    caches = [pool.layer(i) for i in range(TINY.num_layers)]
    return [t for c in caches for f in dataclasses.fields(c) if isinstance(t := getattr(c, f.name), torch.Tensor)]


@pytest.mark.parametrize("kv, fmt_kw", [("bf16", {}), ("int4", {}),
                                        ("int4-bdr", {"hadamard_order": 32, "window": 4, "sinks": 2})])
def test_compiled_decode_matches_eager(kv: str, fmt_kw: dict[str, int]) -> None:
    torch._dynamo.reset()  # each format's graphs from scratch, as a worker compiles them
    fmt = KVFormat.make(kv, TINY.head_dim, **fmt_kw)  # type: ignore[arg-type]
    pool = KVPool(fmt, TINY.num_layers, TINY.num_kv_heads, 64, 4, torch.device("cpu"), frozenset(), 8)
    backend = attention_backend(pool, TINY.head_dim ** -0.5, torch.device("cpu"))
    runner = ModelRunner(_packed_model(backend, seed=7), backend, pool, torch.device("cpu"))
    runner.compile_decode()
    assert runner.compiled is not None, "torch.compile of the decode step failed (see the log)"
    seqs = []
    for i, n in enumerate([13, 21, 6]):  # 13, 21: past the 6-token ring, so INT4 pages are read too
        seq = Sequence(GenerateParams(f"r{i}", prompt(30 + i, n + 1), max_new_tokens=4), sink=lambda ev: None,
                       order=i)
        seq.pages = pool.allocate(pool.pages_for(n + 1)) or []
        seq.window_row = pool.allocate_row()
        seqs.append((seq, n))
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):  # warm-up compiled all
        runner._eager(host_batch(Batch([Chunk(s, 0, n) for s, n in seqs], is_decode=False), pool))
        for rows in (1, 3):
            h = host_batch(Batch([Chunk(s, n, n + 1) for s, n in seqs[:rows]], is_decode=True), pool)
            before = [t.clone() for t in _snapshot(pool)]
            want = runner._eager(h)
            for t, saved in zip(_snapshot(pool), before, strict=True):
                t.copy_(saved)
            got = runner._eager(h, forward=runner.compiled)
            torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)


def test_without_a_compiler_decode_stays_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert compiled.CompiledDecode.build(torch.nn.Linear(2, 2), FullCausalAttention(1, 1), lambda c: None) is None


def test_a_failed_compile_leaves_decode_eager() -> None:
    def warm_up(c: compiled.CompiledDecode) -> None:
        raise RuntimeError("the C++ build failed")

    assert compiled.CompiledDecode.build(torch.nn.Linear(2, 2), FullCausalAttention(1, 1), warm_up) is None
