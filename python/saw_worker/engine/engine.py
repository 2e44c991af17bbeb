"""LocalEngine: the step loop on its own thread, fed by thread-safe submit/abort calls."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from saw_worker.engine.grammar import Grammars
from saw_worker.engine.interface import EngineInfo, LoadStats
from saw_worker.engine.model_runner import ChunkResult, LaunchedStep, ModelRunner
from saw_worker.engine.request import Event, Finish, GenerateParams, RequestError, Sequence, Sink
from saw_worker.engine.scheduler import Batch, Scheduler
from saw_worker.engine.stats import StepStats, StepTotals

log = logging.getLogger("saw_worker.engine")


class LocalEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, info: EngineInfo, overlap: bool = True) -> None:
        self.runner = runner
        self.scheduler = scheduler
        # Overlap: launch decode step N+1 before waiting for step N's tokens, so the host's work
        # (scheduling, batch building, delivering tokens) runs while the GPU computes. A request
        # that finishes at step N then runs one wasted row in N+1.
        self.overlap = overlap
        self._launched: LaunchedStep | None = None
        self._info = info
        tok = info.tokenizer
        self._grammars = Grammars(tok.tokenizer_json, info.vocab_size, tuple(tok.eos_token_ids))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[Sequence] = []
        self._aborts: list[str] = []
        self._live: set[str] = set()
        self._order = 0
        self._load = LoadStats(kv_tokens_total=info.kv_capacity_tokens)
        self._stats = StepStats()
        self.on_step_end: Callable[[], None] | None = None  # set before start(); runs on the engine thread
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="saw-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        """The engine loop on the calling thread, until shutdown() from another one: for the thread that built the
        model. On the CPU, torch's OpenMP threads serve the thread that first used them: steps from any other
        thread measured 1.7-2x slower (2-core EPYC, 2026-12-03)."""
        self._loop()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> LoadStats:
        return self._load

    def step_totals(self) -> StepTotals:
        """A copy of the running step counters (benchmarks read them before and after a run)."""
        return dataclasses.replace(self._stats.totals)

    def submit(self, params: GenerateParams, sink: Sink) -> None:
        info = self._info
        params.validate(info.vocab_size, info.context_length, info.kv_capacity_tokens)
        # compiled here, on the caller's thread: a large schema takes a while, and a bad one is the caller's error
        matcher = self._grammars.matcher(params.grammar) if params.grammar is not None else None
        with self._lock:
            if params.request_id in self._live:
                raise RequestError(f"request id {params.request_id!r} is already running")
            self._live.add(params.request_id)
            self._order += 1
            seq = Sequence(params, sink, self._order)
            seq.matcher = matcher
            self._incoming.append(seq)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        with self._lock:
            found = request_id in self._live
            if found:
                self._aborts.append(request_id)
        self._wake.set()
        return found

    # --- engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            self._step()
            if self.on_step_end is not None:
                self.on_step_end()

    def _step(self) -> None:
        """One scheduling round: a forward pass when there is work, else a short wait for some."""
        self._take_inbox()
        if not self.scheduler.has_work():
            self._collect_launched()
            self._publish_load()
            self._wake.wait(0.5)
            self._wake.clear()
            return
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:  # waiting requests cannot fit yet and nothing runs: cannot happen, but never spin
            self._collect_launched()
            self._wake.wait(0.01)
            return
        try:
            forward_started = time.perf_counter()
            if self.overlap and self.runner.can_launch(batch):
                launched = self.runner.launch(batch, self._launched)  # takes the previous step's tokens on the device
                self._collect_launched()  # while it runs: the previous step's tokens reach the host and the clients
                self.scheduler.on_launched(batch)
                self._launched = launched
            else:
                self._collect_launched()
                self._send_ran(batch, self.runner.run(batch))
            forward_s = time.perf_counter() - forward_started
        except Exception as exc:  # a bug must fail these requests, not the worker
            log.exception("forward pass failed")
            batches = [batch] + ([self._launched.batch] if self._launched is not None else [])
            self._launched = None
            for seq in self.scheduler.on_failed(*batches):
                self._end(seq, Event(finish=Finish.ABORT, error=f"engine error: {exc}"))
            return
        rows = len(batch.chunks) if batch.is_decode else sum(c.end - c.start for c in batch.chunks)
        self._stats.record(batch.is_decode, rows, time.perf_counter() - started, forward_s)
        self._publish_load()

    def _take_inbox(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
        for seq in incoming:
            self.scheduler.add(seq)
        for request_id in aborts:
            seq = self.scheduler.on_abort(request_id)
            if seq is not None:
                self._end(seq, Event(finish=Finish.ABORT))

    def _collect_launched(self) -> None:
        """Wait for the launched decode step, if any, and send its tokens."""
        step, self._launched = self._launched, None
        if step is not None:
            for seq, token, finish in self.scheduler.on_tokens(step.batch, self.runner.collect(step)):
                self._send(seq, Event(token_ids=[token], finish=finish))

    def _send_ran(self, batch: Batch, results: list[ChunkResult]) -> None:
        """Send what a synchronous step gave: sampled tokens, their logprobs, and prompt logprobs with the first."""
        finishes = self.scheduler.on_ran(batch, [r.token for r in results])
        for chunk, result, finish in zip(batch.chunks, results, finishes, strict=True):
            seq = chunk.seq
            if seq.prompt_logprobs is not None and result.prompt_logprobs:
                seq.prompt_logprobs += result.prompt_logprobs
            if result.token is None:
                continue
            ev = Event(token_ids=[result.token], finish=finish)
            if result.logprob is not None:
                ev.logprobs = [result.logprob]
            if seq.prompt_logprobs and seq.num_output == 1:
                ev.prompt_logprobs = seq.prompt_logprobs
            self._send(seq, ev)

    def _send(self, seq: Sequence, ev: Event) -> None:
        if ev.finish is None:
            seq.sink(ev)
        else:
            self._end(seq, ev)

    def _end(self, seq: Sequence, ev: Event) -> None:
        """The last event of a request the scheduler has let go of: with its usage."""
        ev.prompt_tokens = seq.num_prompt
        ev.completion_tokens = seq.num_output
        ev.cached_tokens = seq.cached_prompt
        with self._lock:
            self._live.discard(seq.id)
        seq.sink(ev)

    def _publish_load(self) -> None:
        s = self.scheduler
        live = (*s.running, *s.waiting)
        self._load = LoadStats(
            running=len(s.running),
            waiting=len(s.waiting),
            kv_tokens_used=s.pages.used_tokens,
            kv_tokens_total=s.pool.capacity_tokens,
            outstanding_tokens=sum(q.remaining_tokens() for q in live),
        )
        self._stats.maybe_log(len(s.running), len(s.waiting), s.pages.used_tokens / max(s.pool.capacity_tokens, 1),
                              s.preemptions)
