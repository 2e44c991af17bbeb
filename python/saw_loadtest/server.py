"""Start and stop one `saw-router --kv X ...` for a sweep segment."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag_value(args: list[str], flag: str) -> str | None:
    """The router's value of flag (never a worker's: flags after `--` go to the workers)."""
    if "--" in args:
        args = args[: args.index("--")]
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class RouterProcess:
    """`router_cmd --kv KV --host 127.0.0.1 --port P <passthrough>`, logging to a file."""

    def __init__(self, router_cmd: str, kv: str, passthrough: list[str], log_path: Path) -> None:
        self.passthrough = list(passthrough)
        port = _flag_value(self.passthrough, "--port")
        host = _flag_value(self.passthrough, "--host") or "127.0.0.1"
        extra = [] if port else ["--port", str(free_port())]
        self.port = int(port or extra[1])
        # A router bound to 0.0.0.0 is still reached on loopback.
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"
        self.cmd = [*shlex.split(router_cmd), "--kv", kv, *extra, *self.passthrough]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RouterProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        # Own session: a last-resort kill takes the router's workers too, and nothing else.
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGINT (the router drains and stops its workers), then SIGTERM, then SIGKILL the group."""
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0)):
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
        try:  # workers left behind by a router that died
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
