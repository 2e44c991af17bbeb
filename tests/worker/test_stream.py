"""interface.stream: events from the engine thread reach the consumer in order, and those that
queued up while it was busy leave as one event saying the same."""

from __future__ import annotations

import asyncio
import threading

from saw_worker.engine.interface import stream
from saw_worker.engine.request import Event, Finish, GenerateParams, Sink, TokenLogprob


class BurstEngine:
    """Emits `n` token events (and, when `finish`, a final one) from another thread, all before the
    consumer reads."""

    def __init__(self, n: int, finish: bool = True) -> None:
        self.n = n
        self.finish = finish
        self.aborted: list[str] = []

    def submit(self, params: GenerateParams, sink: Sink) -> None:
        def emit() -> None:
            for i in range(self.n):
                sink(Event(token_ids=[i], logprobs=[TokenLogprob(-float(i))]))
            if self.finish:
                sink(Event(token_ids=[self.n], logprobs=[TokenLogprob(-1.0)], finish=Finish.LENGTH,
                           completion_tokens=5))

        thread = threading.Thread(target=emit)
        thread.start()
        thread.join()

    def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return True


def test_a_burst_arrives_merged_and_complete() -> None:
    async def consume() -> list[Event]:
        return [ev async for ev in stream(BurstEngine(4), GenerateParams("s", [1], max_new_tokens=5))]

    events = asyncio.run(consume())
    tokens = [t for ev in events for t in ev.token_ids]
    assert tokens == [0, 1, 2, 3, 4]
    assert len(events) < 5  # merged: the consumer had not read before the burst ended
    assert [lp.logprob for ev in events for lp in ev.logprobs] == [0.0, -1.0, -2.0, -3.0, -1.0]
    assert events[-1].finish is Finish.LENGTH and events[-1].completion_tokens == 5


def test_leaving_early_aborts_the_request() -> None:
    engine = BurstEngine(3, finish=False)

    async def first_only() -> Event:
        events = stream(engine, GenerateParams("early", [1], max_new_tokens=5))
        async for ev in events:
            await events.aclose()
            return ev
        raise AssertionError("no event")

    assert asyncio.run(first_only()).token_ids == [0, 1, 2]
    assert engine.aborted == ["early"]
