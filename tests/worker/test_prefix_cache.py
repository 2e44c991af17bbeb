"""Prefix caching: named full pages, matching, holding, eviction; and the engine sharing a prompt prefix."""

from __future__ import annotations

import torch
from engine_util import Collector, prompt, run, tiny_engine

from saw_kv.formats import KVFormat
from saw_worker.engine.request import GenerateParams
from saw_worker.kv.pool import KVPool
from saw_worker.kv.prefix_cache import PrefixCache


def cache(num_pages: int = 8) -> PrefixCache:
    return PrefixCache(KVPool(KVFormat("int4", 64), 1, 1, num_pages, 4, torch.device("cpu")))


def test_named_pages_match_a_prefix_and_wait_for_reuse() -> None:
    c = cache()
    tokens = list(range(10, 22))  # three full pages
    pages = c.allocate(3)
    assert pages is not None and c.match(tokens + [99]) == []
    c.name_pages(tokens, pages, computed=11)  # the third page is not computed yet
    assert c.match(tokens + [99]) == pages[:2]
    c.name_pages(tokens, pages, computed=12)
    assert c.match(tokens + [99]) == pages
    assert c.match(tokens) == pages[:2]  # the last token is always computed
    assert c.match([10, 11, 12, 0] + tokens[4:]) == []  # a page matches only after the same prefix
    c.release(pages)
    assert c.free_pages == 7 and c.used_tokens == 0 and c.pool.free_pages == 4  # idle named pages stay
    matched = c.match(tokens + [1, 2])
    assert c.idle_among(matched) == 3
    c.hold(matched)
    assert c.free_pages == 4 and c.used_tokens == 12
    c.release(matched)


def test_allocation_evicts_idle_pages_oldest_first() -> None:
    c = cache()
    a, b = list(range(100, 104)), list(range(200, 204))
    pa, pb = c.allocate(1), c.allocate(1)
    assert pa is not None and pb is not None
    c.name_pages(a, pa, 4)
    c.name_pages(b, pb, 4)
    c.release(pa)
    c.release(pb)
    assert c.allocate(6) is not None  # 5 free pages and the oldest idle one
    assert c.match(a + [0]) == [] and c.match(b + [0]) == pb
    assert c.allocate(2) is None and c.match(b + [0]) == pb  # too few: nothing is taken


def test_a_second_copy_of_a_named_page_stays_private() -> None:
    c = cache()
    tokens = [7, 7, 7, 7]
    first, second = c.allocate(1), c.allocate(1)
    assert first is not None and second is not None
    c.name_pages(tokens, first, 4)
    c.name_pages(tokens, second, 4)
    c.release(second)
    assert c.pool.free_pages == 6  # went straight back to the pool
    assert c.match(tokens + [1]) == first


def test_sinks_kept_with_first_pages_least_recently_used_first_and_freed_with_the_page() -> None:
    fmt = KVFormat.make("int4", 64, window=4, sinks=2)
    c = PrefixCache(KVPool(fmt, 1, 1, 8, 4, torch.device("cpu"), window_rows=2))  # two sink store entries
    ring = c.pool.layer(0).ring_k
    assert ring is not None
    firsts = []
    for i in range(3):
        tokens = [10 * i + j for j in range(4)]
        page = c.allocate(1)
        assert page is not None
        c.keep_sinks(page[0], 0)  # not named yet: nothing kept
        c.name_pages(tokens, page, 4)
        ring[0, :2] = float(i + 1)  # the sinks of request i, in ring row 0
        c.keep_sinks(page[0], 0)
        c.release(page)
        firsts.append(page[0])
        if i == 1:
            assert c.restore_sinks(firsts[0], 1)  # first page 0 is used again: page 1's entry is the oldest
    assert not c.restore_sinks(firsts[1], 1)
    for i in (0, 2):
        assert c.restore_sinks(firsts[i], 1) and (ring[1, :2] == i + 1).all() and (ring[1, 2:] == 0).all()
    c.allocate(6)  # evicts the idle named pages, oldest first: page 0 and its entry go
    assert not c.restore_sinks(firsts[0], 1)


def test_disabled_cache_never_matches() -> None:
    c = PrefixCache(KVPool(KVFormat("bf16", 64), 1, 1, 8, 4, torch.device("cpu")), enabled=False)
    pages = c.allocate(2)
    assert pages is not None
    c.name_pages(list(range(8)), pages, 8)
    c.release(pages)
    assert c.match(list(range(9))) == [] and c.pool.free_pages == 7


def test_engine_serves_a_shared_prefix_from_the_cache() -> None:
    """Requests that share a 26-token system prompt reuse its 6 full pages: the tokens are those of an engine
    without the cache, usage reports the cached prompt tokens, and every page is reclaimable afterwards."""
    system = prompt(50, 26)
    requests = [GenerateParams(f"q{i}", system + prompt(60 + i, 3 + i), max_new_tokens=8, ignore_eos=True)
                for i in range(3)]
    outputs, cached = {}, {}
    for on in (False, True):
        engine = tiny_engine("bf16", prefix_cache=on)
        try:
            outputs[on], cached[on] = {}, {}
            for r in requests:  # one after another, so that each finds the previous ones' pages
                sink = Collector()
                engine.submit(r, sink)
                outputs[on][r.request_id] = sink.wait()
                cached[on][r.request_id] = sink.last.cached_tokens
            again = run(engine, [GenerateParams("again", requests[0].input_ids, max_new_tokens=8, ignore_eos=True)])
            pages = engine.scheduler.pages
            assert pages.free_pages == engine.scheduler.pool.num_pages - 1 and pages.used_tokens == 0
        finally:
            engine.shutdown()
        assert again["again"] == outputs[on]["q0"]
    assert outputs[True] == outputs[False]
    assert cached[False] == {"q0": 0, "q1": 0, "q2": 0}
    assert cached[True] == {"q0": 0, "q1": 24, "q2": 24}


def test_preemption_with_the_cache_keeps_the_tokens() -> None:
    """In a pool too small for the batch, a preempted request's rerun may start from its own named pages:
    the tokens match a roomy engine without the cache, usage never counts more cached tokens than the
    prompt has, and every page is reclaimable at the end."""
    requests = [GenerateParams(f"p{i}", prompt(i, n), max_new_tokens=12, ignore_eos=True)
                for i, n in enumerate([1, 5, 17, 30, 9])]
    roomy = tiny_engine("int4-bdr", num_pages=256, prefill_budget=256, prefix_cache=False)
    small = tiny_engine("int4-bdr", num_pages=12, prefill_budget=8)
    try:
        want = run(roomy, requests)
        sinks = {r.request_id: Collector() for r in requests}
        for r in requests:
            small.submit(r, sinks[r.request_id])
        got = {rid: sink.wait() for rid, sink in sinks.items()}
        assert small.scheduler.preemptions > 0
        assert all(s.last.cached_tokens < s.last.prompt_tokens for s in sinks.values())
        assert small.scheduler.pages.free_pages == 11
    finally:
        roomy.shutdown()
        small.shutdown()
    assert got == want
