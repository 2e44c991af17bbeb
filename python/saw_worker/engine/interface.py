"""The seam between the gRPC server and an engine.

The server knows only this protocol, so another engine (e.g. SGLang's model runner over our KV
pool) can be plugged in without touching the server or the router.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from saw_worker.config import TokenizerInfo
from saw_worker.engine.request import Event, GenerateParams, Sink


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    tokenizer: TokenizerInfo
    context_length: int
    vocab_size: int
    kv_format: str
    kv_capacity_tokens: int
    page_size: int
    device: str
    kv_bytes_per_token: int = 0  # K + V of one token over all layers and KV heads
    kv_window_bytes_per_request: int = 0  # the bf16 ring row and sink-store entry, per running request


@dataclass(frozen=True)
class LoadStats:
    running: int = 0
    waiting: int = 0
    kv_tokens_used: int = 0
    kv_tokens_total: int = 0
    outstanding_tokens: int = 0


class Engine(Protocol):
    def info(self) -> EngineInfo: ...

    def submit(self, params: GenerateParams, sink: Sink) -> None:
        """Queue a request; raises RequestError for bad input. sink gets events from the engine's thread."""

    def abort(self, request_id: str) -> bool: ...

    def load(self) -> LoadStats: ...


class _EventPump:
    """Carries events from the engine thread into one event loop with one wake-up per burst: a
    decode step emits an event for every running request, and waking the loop (a syscall) for
    each one costs the engine thread more than the step's Python bookkeeping."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def put(self, queue: asyncio.Queue[Event], ev: Event) -> None:
        with self._lock:
            wake = not self._pending
            self._pending.append((queue, ev))
        if wake:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, ev in pending:
            queue.put_nowait(ev)


_pumps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _EventPump] = weakref.WeakKeyDictionary()


async def stream(engine: Engine, params: GenerateParams) -> AsyncIterator[Event]:
    """Submit and yield events until the last one; leaving early (client gone) aborts the request.
    Events that queued up while the consumer was busy leave as one, so a slow consumer gets fewer,
    larger messages instead of falling further behind."""
    loop = asyncio.get_running_loop()
    pump = _pumps.get(loop) or _pumps.setdefault(loop, _EventPump(loop))
    events: asyncio.Queue[Event] = asyncio.Queue()
    engine.submit(params, lambda ev: pump.put(events, ev))
    finished = False
    try:
        while not finished:
            ev = await events.get()
            while ev.finish is None and not events.empty():
                ev = ev.followed_by(events.get_nowait())
            finished = ev.finish is not None
            yield ev
    finally:
        if not finished:
            engine.abort(params.request_id)
