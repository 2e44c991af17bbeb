"""`python -m saw_worker`: one worker process serving the gRPC protocol of proto/saw.proto."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from saw_worker import sglang_aliases
from saw_worker.engine.process import ProcessEngine
from saw_worker.flags import add_options, read_options
from saw_worker.loader import ModelLoadError
from saw_worker.options import WorkerOptions

if TYPE_CHECKING:
    from saw_sglang.engine import SGLangEngine

TOKEN_ENV = "SAW_WORKER_TOKEN"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m saw_worker",
        description="saw worker: a paged-KV, continuous-batching engine served over gRPC (proto/saw.proto). "
                    "Switches take --name, --name=BOOL (1/true/yes/on, 0/false/no/off) or --no-name.",
        epilog=sglang_aliases.HELP,
        argument_default=argparse.SUPPRESS,  # flags not given keep their WorkerOptions defaults
    )
    add_options(p, WorkerOptions)
    sglang_aliases.add_flags(p)
    return p


def options_from_argv(argv: list[str] | None, env: Mapping[str, str]) -> WorkerOptions:
    """Flags first, then the SGLang-fork environment aliases, then the WorkerOptions defaults."""
    given = vars(parser().parse_args(argv))
    return read_options(WorkerOptions, sglang_aliases.resolve(given, env))


def worker_token(opts: WorkerOptions, env: Mapping[str, str]) -> str | None:
    """--token-file's first line, else $SAW_WORKER_TOKEN, else None (no token asked for)."""
    path = opts.server.token_file
    if path is None:
        return env.get(TOKEN_ENV) or None
    with open(path) as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{path} holds no token (its first line is empty)")
    return token


def build_engine(opts: WorkerOptions) -> ProcessEngine | SGLangEngine:
    """--engine: saw's own engine in a child process, or SGLang's (its scheduler in processes of its own)."""
    if opts.model.engine == "sglang":
        from saw_sglang.engine import SGLangEngine

        return SGLangEngine(opts)
    return ProcessEngine(opts, logging.getLogger().level)


async def _serve(opts: WorkerOptions, token: str | None) -> None:
    from saw_worker.server import serve

    log = logging.getLogger("saw_worker")
    if token is None:
        log.warning("no worker token (--token-file or $%s): any local process can call this worker", TOKEN_ENV)
    engine = build_engine(opts)
    engine.start()
    # A signal while the model loads ends both processes at once; from here on it stops them cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    died = threading.Event()

    def on_death() -> None:
        died.set()
        loop.call_soon_threadsafe(stop.set)

    engine.on_death = on_death
    try:
        where = opts.server
        address = f"unix:{where.unix_socket}" if where.unix_socket else f"{where.host}:{where.port}"
        server = await serve(engine, address, token)
        info = engine.info()
        log.info("ready: %s, kv %s (%d tokens), %s, listening on %s", info.model_id, info.kv_format,
                 info.kv_capacity_tokens, info.device, address)
        await stop.wait()
        await server.stop(grace=5)
    finally:
        # Always: the engine process ignores SIGTERM once serving, and ends when told (or when this one dies).
        engine.shutdown()
    if died.is_set():
        raise RuntimeError("the engine process exited; see the log above")


def main(argv: list[str] | None = None) -> int:
    try:
        opts = options_from_argv(argv, os.environ)
        logging.basicConfig(level=opts.server.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        # Read, then removed: the processes this one starts need not see it.
        token = worker_token(opts, os.environ)
        os.environ.pop(TOKEN_ENV, None)
        asyncio.run(_serve(opts, token))
    except (ModelLoadError, ValueError, OSError, RuntimeError) as exc:
        # Load errors (missing/corrupt files, unsupported architectures, bad flags or aliases) end here, without a
        # traceback.
        print(f"saw_worker: error: {exc}", file=sys.stderr)
        return 2
    return 0
