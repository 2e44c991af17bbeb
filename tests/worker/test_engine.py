"""The engine on a tiny random model: batching, chunking, preemption, abort, sampling, bad input."""

from __future__ import annotations

import pytest
from engine_util import VOCAB, Collector, prompt, run, tiny_engine

from saw_worker.engine.request import Finish, GenerateParams, RequestError, SamplingOptions, Sequence


def greedy(rid: str, ids: list[int], n: int = 12, **kw: object) -> GenerateParams:
    return GenerateParams(rid, ids, max_new_tokens=n, ignore_eos=True, **kw)  # type: ignore[arg-type]


REQUESTS = [greedy(f"r{i}", prompt(i, n)) for i, n in enumerate([1, 5, 17, 30, 9])]


@pytest.mark.parametrize("kv", ["bf16", "int4", "int4-bdr"])
def test_batch_equals_each_request_alone(kv: str) -> None:
    engine = tiny_engine(kv)
    try:
        together = run(engine, REQUESTS)
        alone = {r.request_id: run(engine, [r])[r.request_id] for r in REQUESTS}
    finally:
        engine.shutdown()
    assert together == alone
    assert all(len(t) == 12 for t in together.values())


def test_chunked_prefill_and_preemption_give_the_same_tokens() -> None:
    big = tiny_engine("int4-bdr", num_pages=256, prefill_budget=256)
    # 11 usable pages of 4 tokens cannot hold five requests of up to 42 tokens: decode must preempt.
    small = tiny_engine("int4-bdr", num_pages=12, prefill_budget=8)
    try:
        want = run(big, REQUESTS)
        got = run(small, REQUESTS)
        assert small.scheduler.pages.free_pages == 11
        assert small.scheduler.preemptions > 0
    finally:
        big.shutdown()
        small.shutdown()
    assert got == want


def test_reserving_decode_room_queues_instead_of_preempting() -> None:
    """With room kept for every admitted request's outputs, the same tight pool never preempts:
    requests wait for pages instead, and the tokens are the same."""
    big = tiny_engine("int4", num_pages=256)
    small = tiny_engine("int4", num_pages=12, prefill_budget=8, reserve_decode_tokens=12)
    try:
        want = run(big, REQUESTS)
        got = run(small, REQUESTS)
        assert small.scheduler.preemptions == 0
        assert small.scheduler.pages.free_pages == 11
    finally:
        big.shutdown()
        small.shutdown()
    assert got == want


def test_overlapped_steps_match_synchronous_ones() -> None:
    """Launching decode step N+1 before step N's tokens reach the host changes nothing a client sees
    (tokens, finish reasons, usage), with early stops, seeded sampling and preemption in the mix."""
    workload = [*REQUESTS,
                GenerateParams("stop", prompt(2, 8), max_new_tokens=10, stop_token_ids=frozenset(range(40, VOCAB))),
                GenerateParams("seeded", prompt(7, 6), max_new_tokens=9,
                               sampling=SamplingOptions(temperature=0.8, seed=3))]
    outcomes = {}
    for overlap in (False, True):
        engine = tiny_engine("int4-bdr", num_pages=16, prefill_budget=8, overlap=overlap)
        try:
            sinks = {r.request_id: Collector() for r in workload}
            for r in workload:
                engine.submit(r, sinks[r.request_id])
            outcomes[overlap] = {rid: (c.wait(), c.last.finish, c.last.completion_tokens) for rid, c in sinks.items()}
            assert engine.scheduler.pages.free_pages == 15
            assert engine.scheduler.preemptions > 0
        finally:
            engine.shutdown()
    assert outcomes[True] == outcomes[False]
    assert all(n == len(tokens) for tokens, _, n in outcomes[True].values())


def test_a_launched_token_is_sequence_state_until_it_reaches_the_host() -> None:
    """The loop's overlap calls by hand: a launched step's token is known on the device only (launched_row) and never
    stands in token_ids; the next step reads it there; an abort meanwhile names only host-known pages, and its
    in-flight token is dropped."""
    sync = tiny_engine("int4-bdr", overlap=False)
    try:
        want = run(sync, [greedy("s0", prompt(0, 9), n=3)])["s0"]
    finally:
        sync.shutdown()
    engine = tiny_engine("int4-bdr", num_pages=16)
    engine.shutdown()  # the loop stops; the scheduler and runner stay
    sched, runner = engine.scheduler, engine.runner
    seqs = [Sequence(greedy(f"s{i}", prompt(i, 9), n=20), sink=lambda ev: None, order=i + 1) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    prefill = sched.schedule()
    assert prefill is not None and not prefill.is_decode
    assert sched.on_ran(prefill, [r.token for r in runner.run(prefill)]) == [None, None]
    first = sched.schedule()
    assert first is not None and runner.can_launch(first)
    step1 = runner.launch(first, None)
    sched.on_launched(first)
    for row, seq in enumerate(seqs):  # the next token is on the device only; its position is taken
        assert (seq.launched_row, len(seq.token_ids), seq.num_tokens, seq.cached) == (row, 10, 11, 10)
    second = sched.schedule()
    assert second is not None and [(c.start, c.end) for c in second.chunks] == [(10, 11)] * 2
    step2 = runner.launch(second, step1)  # before step 1's tokens reach the host
    arrived = sched.on_tokens(first, runner.collect(step1))
    assert [(seq, finish) for seq, _, finish in arrived] == [(seqs[0], None), (seqs[1], None)]
    assert all(seq.launched_row is None and len(seq.token_ids) == 11 for seq in seqs)
    sched.on_launched(second)
    assert sched.on_abort("s1") is seqs[1] and seqs[1].finished and not seqs[1].pages
    assert len(sched.pages.match(seqs[1].token_ids)) == 2  # its computed full pages, all known tokens
    arrived = sched.on_tokens(second, runner.collect(step2))
    assert [seq for seq, _, _ in arrived] == [seqs[0]]  # the aborted request's token goes nowhere
    assert seqs[0].token_ids[9:] == want and seqs[1].num_output == 2
    assert sched.on_abort("s0") is seqs[0] and not sched.has_work()


def test_a_failed_overlapped_step_fails_its_requests_and_the_engine_keeps_serving() -> None:
    engine = tiny_engine("int4")
    launch, calls = engine.runner.launch, []

    def failing_launch(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:  # a step launched and not yet collected: both steps' requests fail
            raise RuntimeError("boom")
        return launch(*args)

    engine.runner.launch = failing_launch  # type: ignore[method-assign]
    try:
        sinks = {f"f{i}": Collector() for i in range(3)}
        for rid, sink in sinks.items():
            engine.submit(greedy(rid, prompt(int(rid[1]), 6), n=50), sink)
        for sink in sinks.values():
            sink.wait()
            assert sink.last.finish is Finish.ABORT and "boom" in (sink.last.error or "")
            assert sink.last.completion_tokens == len([t for ev in sink.events for t in ev.token_ids])
        pages = engine.scheduler.pages
        assert pages.free_pages == engine.scheduler.pool.num_pages - 1 and not engine.scheduler.has_work()
        assert run(engine, [greedy("ok", [5, 6], n=4)])["ok"]
    finally:
        engine.shutdown()


def test_bf16_layers_keep_those_layers_exact() -> None:
    """Every layer at bf16 reproduces the bf16 format; one bf16 layer changes some tokens of int4."""
    engines = {"bf16": tiny_engine("bf16"), "all": tiny_engine("int4", bf16_layers=frozenset({0, 1})),
               "first": tiny_engine("int4", bf16_layers=frozenset({0})), "int4": tiny_engine("int4")}
    try:
        out = {name: run(e, REQUESTS) for name, e in engines.items()}
        assert engines["first"].scheduler.pool.formats[0].name == "bf16"
        assert engines["first"].scheduler.pool.formats[1].name == "int4"
    finally:
        for e in engines.values():
            e.shutdown()
    assert out["all"] == out["bf16"]
    assert out["first"] != out["int4"]


def test_abort_frees_every_page() -> None:
    engine = tiny_engine("int4", max_running=64)
    try:
        pool = engine.scheduler.pool
        pages = engine.scheduler.pages
        sinks = [Collector() for _ in range(6)]
        for i, sink in enumerate(sinks):
            engine.submit(greedy(f"a{i}", prompt(i, 20), n=400), sink)
        for i in range(6):
            assert engine.abort(f"a{i}")
        for sink in sinks:
            sink.wait()
            assert sink.last.finish is Finish.ABORT
        assert pages.free_pages == pool.num_pages - 1 and pages.used_tokens == 0
        assert not engine.scheduler.has_work()
        assert not engine.abort("a0")  # already gone
    finally:
        engine.shutdown()


def test_seed_reproduces_and_differs() -> None:
    engine = tiny_engine("int4-bdr")

    def sampled(rid: str, seed: int) -> GenerateParams:
        return GenerateParams(rid, prompt(7, 6), max_new_tokens=16, ignore_eos=True,
                              sampling=SamplingOptions(temperature=1.0, top_p=0.9, top_k=40, seed=seed))

    try:
        out = run(engine, [sampled("a", 1), sampled("b", 1), sampled("c", 2), greedy("g", prompt(8, 3))])
    finally:
        engine.shutdown()
    assert out["a"] == out["b"]
    assert out["a"] != out["c"]


def test_stop_rules() -> None:
    engine = tiny_engine("bf16")
    try:
        base = run(engine, [greedy("base", prompt(2, 8), n=10)])["base"]
        stop_at = base[4]
        out = run(engine, [
            GenerateParams("stop", prompt(2, 8), max_new_tokens=10, stop_token_ids=frozenset({stop_at})),
            GenerateParams("min", prompt(2, 8), max_new_tokens=10, min_new_tokens=10,
                           stop_token_ids=frozenset({stop_at})),
        ])
    finally:
        engine.shutdown()
    first = base.index(stop_at)
    assert out["stop"] == base[: first + 1]  # the stop token is the last one sent
    assert out["min"] == base  # min_new_tokens holds it back


def test_eos_finishes_unless_ignored() -> None:
    base_engine = tiny_engine("bf16")
    try:
        base = run(base_engine, [greedy("base", prompt(3, 4), n=10)])["base"]
    finally:
        base_engine.shutdown()
    eos = base[3]
    engine = tiny_engine("bf16", eos=eos)
    try:
        sink = Collector()
        engine.submit(GenerateParams("e", prompt(3, 4), max_new_tokens=10), sink)
        tokens = sink.wait()
        ignored = run(engine, [greedy("i", prompt(3, 4), n=10)])["i"]
    finally:
        engine.shutdown()
    assert tokens == base[: base.index(eos) + 1] and sink.last.finish is Finish.STOP
    assert sink.last.completion_tokens == len(tokens) and sink.last.prompt_tokens == 4
    assert ignored == base


def test_prompt_logprobs_agree_with_generation_logprobs() -> None:
    engine = tiny_engine("int4-bdr", prefill_budget=5)  # prompt logprobs across chunks
    try:
        ids = prompt(4, 13)
        gen = Collector()
        engine.submit(GenerateParams("g", ids, max_new_tokens=1, return_logprobs=True), gen)
        token = gen.wait()[0]
        lp = gen.last.logprobs[0].logprob
        echo = Collector()
        engine.submit(GenerateParams("p", ids + [token], max_new_tokens=1, prompt_logprobs=True, top_logprobs=3),
                      echo)
        echo.wait()
        plp = echo.events[0].prompt_logprobs
    finally:
        engine.shutdown()
    assert len(plp) == 14
    assert plp[-1].logprob == pytest.approx(lp, abs=1e-4)
    assert len(plp[-1].top) == 3 and plp[-1].top[0][0] == token  # greedy token is the most likely


@pytest.mark.parametrize("params,message", [
    (GenerateParams("x", [], max_new_tokens=4), "empty"),
    (GenerateParams("x", [5] * 600, max_new_tokens=4), "context length"),
    (GenerateParams("x", [5, 500], max_new_tokens=4), "outside the vocabulary"),
    (GenerateParams("x", [5], max_new_tokens=0), "at least 1"),
    (GenerateParams("x", [5], max_new_tokens=4, sampling=SamplingOptions(temperature=float("nan"))), "temperature"),
    (GenerateParams("x", [5], max_new_tokens=4, sampling=SamplingOptions(temperature=-1)), "temperature"),
])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(params: GenerateParams, message: str) -> None:
    engine = tiny_engine("int4")
    try:
        with pytest.raises(RequestError, match=message):
            engine.submit(params, Collector())
        assert run(engine, [greedy("ok", [5, 6], n=2)])["ok"]
    finally:
        engine.shutdown()


def test_load_reports_capacity_and_use() -> None:
    engine = tiny_engine("int4", num_pages=32)
    try:
        sink = Collector()
        engine.submit(greedy("l", prompt(1, 10), n=200), sink)
        for _ in range(200):
            if engine.load().running:
                break
            sink.done.wait(0.01)
        load = engine.load()
        assert load.kv_tokens_total == 31 * 4
        assert load.running == 1 and load.kv_tokens_used >= 12
        engine.abort("l")
        sink.wait()
    finally:
        engine.shutdown()
