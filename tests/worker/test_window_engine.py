"""The bf16 window and sinks (--window, --sinks): what each step attends to, ring rows in the scheduler, whole
engine."""

from __future__ import annotations

import math

import pytest
import torch
from engine_util import Collector, prompt, run, tiny_engine

from saw_kv.formats import KVFormat, decode_k, decode_o, dequantize_int4, encode_k, quantize_int4
from saw_worker.engine.engine import LocalEngine
from saw_worker.engine.model_runner import host_batch
from saw_worker.engine.request import GenerateParams, Sequence
from saw_worker.engine.scheduler import Batch, Chunk
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference_backend import ReferenceBackend


def stored_raw(k: torch.Tensor, v: torch.Tensor, fmt: KVFormat, pool: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [T, Hkv, D] as the INT4 pages give them back, in the model's space."""
    k_hat = dequantize_int4(*quantize_int4(encode_k(k, fmt, pool.k_mean[0])))
    v_hat = dequantize_int4(*quantize_int4(v.float()))
    return decode_k(k_hat, fmt, pool.k_mean[0]), decode_o(v_hat, fmt)


def expected(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """float64 causal attention of the last q.shape[0] positions over keys/values [L, Hkv, D]."""
    n, hq, _ = q.shape
    group = hq // keys.shape[1]
    kk = keys.double().repeat_interleave(group, 1)
    vv = values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,lhd->hql", q.double(), kk) * sm_scale
    length = keys.shape[0]
    pos = torch.arange(length - n, length)
    scores = scores.masked_fill(torch.arange(length)[None, :] > pos[:, None], float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(scores, -1), vv)


@pytest.mark.parametrize("window,sinks,page,chunks", [
    (4, 0, 4, [1] * 15),  # decode steps only: the ring wraps every 4 tokens
    (6, 0, 4, [9, 1, 1, 5, 1, 1, 1]),  # chunked prefill longer than the window, then decode
    (16, 0, 4, [3, 3, 1, 1]),  # the window never fills
    (4, 2, 4, [1] * 15),  # sinks from the first decode steps on
    (6, 4, 4, [9, 1, 1, 5, 1, 1, 1]),  # sinks from a prefill chunk longer than sinks + window
    (3, 5, 4, [2, 1, 1, 3, 1, 1, 1]),  # more sinks than the first chunks hold
])
def test_each_step_attends_its_window_and_sinks_at_bf16_and_the_rest_from_int4(window: int, sinks: int, page: int,
                                                                              chunks: list[int]) -> None:
    """Step by step through the attention the models call: the first S positions and positions [P - W, P + n)
    at bf16 (ring, then the step's own tokens), the ones between as the INT4 pages store them."""
    torch.manual_seed(0)
    d, hq, hkv = 64, 6, 2
    fmt = KVFormat.make("int4-bdr", d, 32, k_center=True, window=window, sinks=sinks)
    pool = KVPool(fmt, 1, hkv, num_pages=16, page_size=page, device=torch.device("cpu"), window_rows=2)
    pool.k_mean = torch.randn(1, hkv, d)
    backend = ReferenceBackend(pool, 1 / math.sqrt(d))
    total = sum(chunks)
    seq = Sequence(GenerateParams("r", list(range(total)), max_new_tokens=1), sink=lambda ev: None, order=0)
    seq.pages = pool.allocate(pool.pages_for(total)) or []
    seq.window_row = pool.allocate_row()
    keys = torch.randn(total, hkv, d) * 3
    values = torch.randn(total, hkv, d)
    k_hat, v_hat = stored_raw(keys, values, fmt, pool)
    start = 0
    for n in chunks:
        end = start + n
        h = host_batch(Batch([Chunk(seq, start, end)], is_decode=False), pool)
        held = min(sinks, start)
        bf16_from = start - min(window, start - held)
        assert (h.window_sinks, h.window_lens, h.quant_lens) == ([held], [start - bf16_from], [bf16_from])
        backend.prepare(h)
        q = torch.randn(n, hq, d)
        out = backend(0, q, keys[start:end], values[start:end])
        k_src = torch.cat([keys[:held].bfloat16().float(), k_hat[held:bf16_from],
                           keys[bf16_from:end].bfloat16().float()])
        v_src = torch.cat([values[:held].bfloat16().float(), v_hat[held:bf16_from],
                           values[bf16_from:end].bfloat16().float()])
        want = expected(q, k_src, v_src, 1 / math.sqrt(d))
        assert (out.double() - want).abs().max() < 1e-4, (start, end)
        start = end


def test_a_window_as_long_as_the_context_gives_the_bf16_tokens() -> None:
    """With W past every request's length nothing is read from INT4: int4-bdr must answer exactly as bf16,
    through chunked prefill, batching and preemption (a small pool), and the ring rows all come back."""
    requests = [GenerateParams(f"r{i}", prompt(i, 5 + 7 * i), max_new_tokens=12, ignore_eos=True) for i in range(5)]
    want = run(tiny_engine("bf16", num_pages=20, prefill_budget=8), requests)
    engine = tiny_engine("int4-bdr", num_pages=20, prefill_budget=8, hadamard_order=32, k_center=True,
                         window=256)
    got = run(engine, requests)
    assert got == want
    pool = engine.runner.pool
    assert pool.free_rows == pool.window_rows
    assert engine.scheduler.preemptions > 0  # the pool was small enough to exercise it


def test_window_rows_limit_admission_and_return_on_finish() -> None:
    engine = tiny_engine("int4", max_running=2, window=4)
    requests = [GenerateParams(f"r{i}", prompt(i, 9), max_new_tokens=6, ignore_eos=True) for i in range(6)]
    out = run(engine, requests)
    assert all(len(t) == 6 for t in out.values())
    pool = engine.runner.pool
    assert pool.window_rows == 3 and pool.free_rows == 3


def test_the_k_scale_folded_into_the_model_leaves_its_outputs_unchanged() -> None:
    """DecoderLayer.k_scale (q lambda, k / lambda after RoPE, powers of two) changes what the cache stores,
    not what attention computes: with a bf16 cache the greedy tokens are the same."""
    requests = [GenerateParams(f"r{i}", prompt(i, 9 + 5 * i), max_new_tokens=8, ignore_eos=True) for i in range(3)]
    want = run(tiny_engine("bf16"), requests)
    engine = tiny_engine("bf16")
    for layer in engine.runner.model.layers:
        layer.k_scale = torch.exp2(torch.randint(-3, 4, (layer.nkv, layer.d)).float())
    assert run(engine, requests) == want


def test_a_request_served_from_the_prefix_cache_starts_its_ring_at_the_first_computed_token() -> None:
    """The second run of a prompt takes its full pages from the cache: its ring holds nothing before the
    first token it computes (those pages are read in INT4), and it still finishes and gives its row back."""
    engine = tiny_engine("int4-bdr", hadamard_order=32, k_center=True, window=4)
    ids = prompt(7, 13)
    first = Collector()
    engine.submit(GenerateParams("a", ids, max_new_tokens=6, ignore_eos=True), first)
    first.wait()
    second = Collector()
    engine.submit(GenerateParams("b", ids, max_new_tokens=6, ignore_eos=True), second)
    assert len(second.wait()) == 6
    assert second.last.cached_tokens == 12  # three full pages of 4
    pool = engine.runner.pool
    assert pool.free_rows == pool.window_rows



def _generate(engine: LocalEngine, ids: list[int]) -> tuple[list[float], list[int], int]:
    """6 greedy tokens after ids: their logprobs, the tokens, and the prompt tokens the prefix cache served."""
    out = Collector()
    engine.submit(GenerateParams(f"r{len(ids)}", ids, max_new_tokens=6, ignore_eos=True, return_logprobs=True), out)
    tokens = out.wait()
    return [lp.logprob for ev in out.events for lp in ev.logprobs], tokens, out.last.cached_tokens


def _close(a: list[float], b: list[float]) -> bool:
    """Equal up to fp32 summation order (~1e-4 after the tiny model's layers), ten times below what reading the
    sinks from INT4 moves them by."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3


@pytest.mark.parametrize("prompt_len", [5, 3])  # the first page is named at prefill, or when the request ends
def test_a_prefix_cache_hit_gets_its_sinks_back_at_bf16(prompt_len: int) -> None:
    """The cached first page holds the 4 sinks and the window covers the rest: a hit on that page reads nothing
    from INT4, so it answers as bf16 does (reading the sinks from INT4 moves the logprobs by ~1e-2)."""
    bf16 = tiny_engine("bf16")
    engine = tiny_engine("int4-bdr", hadamard_order=32, k_center=True, window=256, sinks=4)
    ids = prompt(5, prompt_len)
    first, tokens, _ = _generate(engine, ids)
    assert _close(first, _generate(bf16, ids)[0])
    again_ids = (ids + tokens)[:5]
    again, _, cached = _generate(engine, again_ids)
    assert cached == 4
    assert _close(again, _generate(bf16, again_ids)[0])
    pool = engine.runner.pool
    assert pool.free_rows == pool.window_rows
