"""Start `saw-router` for one KV spec, wait for /health, stop it cleanly (SIGINT, then TERM, then KILL)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from saw_eval.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Router:
    """`saw-router --kv <spec> --model M --port P --workers 1 <extra>`; spec is e.g. "int4-bdr --k-center"."""

    def __init__(self, spec: str, model: str, extra: list[str], log_dir: Path, ready_timeout: float = 900) -> None:
        exe = shutil.which("saw-router")
        if exe is None:
            raise RuntimeError("saw-router is not on PATH (pip install . builds it), or pass --base-url")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [exe, "--kv", *shlex.split(spec), "--model", model, "--workers", "1",
                    "--host", "127.0.0.1", "--port", str(self.port), *extra]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"router-{spec.replace(' ', '_').replace('-', '')}-{self.port}.log"
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Router:
        self._log = open(self.log_path, "wb")
        # Own process group: a last-resort kill reaches the router's workers and nothing else.
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        probe = Client.__new__(Client)
        probe.base, probe.api_key, probe.timeout = self.url, None, 5.0
        while not probe.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"saw-router did not become healthy: {' '.join(self.cmd)}\n" + "\n".join(tail))
            time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:  # workers orphaned by a router that died
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        self.proc = None
