"""ProcessEngine: a LocalEngine in a child process, behind the same Engine protocol.

The gRPC server does Python work for every token of every stream. In one process that work holds
the GIL while the step loop waits for it: on an H100 a batch-256 decode step took 34-40 ms
through the server against 19.5 ms offline. In its own process the loop never waits; the two
talk over one pipe, and each engine step sends the events of all its requests as one message.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from saw_worker.engine.interface import EngineInfo, LoadStats
from saw_worker.engine.request import Event, Finish, GenerateParams, RequestError, Sink
from saw_worker.options import WorkerOptions

if TYPE_CHECKING:
    from saw_worker.engine.engine import LocalEngine

log = logging.getLogger("saw_worker.engine")


@dataclass
class _StepOutput:
    """Child to parent, once per engine step that had something to say."""

    events: list[tuple[str, Event]]
    load: LoadStats


class ProcessEngine:
    def __init__(self, options: WorkerOptions, log_level: int = logging.INFO) -> None:
        """Builds the engine from options in the child. Blocks until it is built; raises RuntimeError with the
        child's message when it cannot be."""
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(options, child_conn, log_level), name="saw-engine",
                                 daemon=True)
        self._proc.start()
        child_conn.close()
        try:
            kind, payload = self._conn.recv()
        except EOFError:  # killed (e.g. out of memory) before it could say why
            self._proc.join(timeout=10)
            kind, payload = "failed", f"the engine process exited during start-up (code {self._proc.exitcode})"
        if kind != "ready":
            self._proc.join(timeout=10)
            raise RuntimeError(payload)
        self._info: EngineInfo = payload
        self._load = LoadStats(kv_tokens_total=self._info.kv_capacity_tokens)
        self._send_lock = threading.Lock()
        self._sinks: dict[str, Sink] = {}
        self._sinks_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="saw-engine-events", daemon=True)
        self.dead = False
        self._stopping = False
        self.on_death: Callable[[], None] | None = None  # e.g. stop the server, so a supervisor restarts it

    def start(self) -> None:
        self._reader.start()

    def shutdown(self) -> None:
        self._stopping = True  # the reader then takes the child's exit for the end it is, not a crash
        self._send(("stop", None))
        self._proc.join(timeout=15)
        if self._proc.is_alive():
            self._proc.kill()

    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> LoadStats:
        return self._load

    def submit(self, params: GenerateParams, sink: Sink) -> None:
        info = self._info
        params.validate(info.vocab_size, info.context_length, info.kv_capacity_tokens)
        with self._sinks_lock:
            if self.dead:
                raise RuntimeError("the engine process has exited")
            if params.request_id in self._sinks:
                raise RequestError(f"request id {params.request_id!r} is already running")
            self._sinks[params.request_id] = sink
        self._send(("submit", params))

    def abort(self, request_id: str) -> bool:
        with self._sinks_lock:
            found = request_id in self._sinks
        if found:
            self._send(("abort", request_id))
        return found

    def _send(self, message: tuple[str, object]) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, OSError):
                pass  # the reader sees the child gone and fails every request

    def _read(self) -> None:
        while True:
            try:
                out: _StepOutput = self._conn.recv()
            except (EOFError, OSError):
                break
            self._load = out.load
            for request_id, ev in out.events:
                with self._sinks_lock:
                    sink = self._sinks.pop(request_id) if ev.finish is not None else self._sinks.get(request_id)
                if sink is not None:
                    sink(ev)
        # The engine process is gone (crash, CUDA error, or shutdown): nothing running can finish.
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        with self._sinks_lock:
            self.dead = True
            sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(Event(finish=Finish.ABORT, error=f"the engine process exited (code {code})"))
        if code != 0 and not self._stopping:
            log.error("engine process exited with code %s; %d requests failed", code, len(sinks))
            if self.on_death is not None:
                self.on_death()


def _child_main(options: WorkerOptions, conn: Connection, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from saw_worker.builder import build_engine

    try:
        engine = build_engine(options)
    except Exception as exc:  # the parent reports it and exits; a traceback only for bugs
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        log.debug("%s", traceback.format_exc())
        return
    # Once serving, the server process ends this one ("stop", or the pipe closing when it dies). A SIGTERM
    # or SIGINT sent to the whole process group (the router stopping its worker, Ctrl-C) must not kill it
    # first: the server would take that for an engine crash and fail its requests with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox: list[tuple[str, Event]] = []
    lock = threading.Lock()
    last_load = engine.load()

    def flush() -> None:
        """Runs on the engine thread after every step and idle wake-up (and on a refused submit)."""
        nonlocal last_load
        with lock:
            events = outbox[:]
            outbox.clear()
            load = engine.load()
            if events or load != last_load:
                last_load = load
                conn.send(_StepOutput(events, load))

    engine.on_step_end = flush
    threading.Thread(target=_receive, args=(engine, conn, outbox, lock, flush), name="saw-engine-inbox",
                     daemon=True).start()
    conn.send(("ready", engine.info()))
    engine.run()  # on this thread, which built the model; until _receive shuts it down


def _receive(engine: LocalEngine, conn: Connection, outbox: list[tuple[str, Event]], lock: threading.Lock,
             flush: Callable[[], None]) -> None:
    """The server's commands, until "stop" or the pipe closing (the server process is gone)."""
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            break
        if kind == "stop":
            break
        if kind == "submit":
            params: GenerateParams = payload  # type: ignore[assignment]

            def sink(ev: Event, request_id: str = params.request_id) -> None:
                with lock:
                    outbox.append((request_id, ev))

            try:
                engine.submit(params, sink)
            except RequestError as exc:
                sink(Event(finish=Finish.ABORT, error=str(exc), refused=True))
                flush()
        elif kind == "abort":
            engine.abort(payload)  # type: ignore[arg-type]
    engine.shutdown()
