"""The seam between the gRPC server and an engine.

The server knows only this protocol, so another engine (e.g. SGLang's model runner over our KV
pool) can be plugged in without touching the server or the router.
"""

from __future__ import annotations

import asyncio
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


async def stream(engine: Engine, params: GenerateParams) -> AsyncIterator[Event]:
    """Submit and yield events until the last one; leaving early (client gone) aborts the request."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    engine.submit(params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    finished = False
    try:
        while not finished:
            ev = await events.get()
            finished = ev.finish is not None
            yield ev
    finally:
        if not finished:
            engine.abort(params.request_id)
