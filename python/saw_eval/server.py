"""Start `saw-router` for one KV spec and wait for /health; starting and stopping the process is the
load tester's RouterProcess (SIGINT, then TERM, then KILL of its process group)."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from saw_eval.client import Client
from saw_loadtest.server import RouterProcess


class Router(RouterProcess):
    """`saw-router --kv <spec> --model M --workers 1 <extra> [-- <worker flags>]`; spec is e.g.
    "int4-bdr --k-center false"."""

    def __init__(self, spec: str, model: str, extra: list[str], log_dir: Path, ready_timeout: float = 900,
                 worker_flags: list[str] | None = None) -> None:
        if shutil.which("saw-router") is None:
            raise RuntimeError("saw-router is not on PATH (pip install . builds it), or pass --base-url")
        kv, *flags = shlex.split(spec)
        name = spec.replace(" ", "_").replace("-", "")
        workers = ["--", *worker_flags] if worker_flags else []
        super().__init__("saw-router", kv, [*flags, "--model", model, "--workers", "1", *extra, *workers],
                         log_dir / f"router-{name}.log")
        self.ready_timeout = ready_timeout

    def __enter__(self) -> Router:
        super().__enter__()
        deadline = time.monotonic() + self.ready_timeout
        probe = Client(self.url, model="(probe)", timeout=5.0)  # a model name skips the /v1/models call
        while not probe.healthy():
            if not self.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"saw-router did not become healthy: {' '.join(self.cmd)}\n{self.log_tail(15)}")
            time.sleep(1.0)
        return self
