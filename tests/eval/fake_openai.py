"""A minimal OpenAI-compatible server for CLI tests: deterministic echo logprobs and canned chat replies."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def fake_logprobs(ids: list[int], noise: float) -> dict[str, Any]:
    """Position i: observed token has prob 0.5 (minus `noise`), one alternative 'alt' has the rest of top-2."""
    p = 0.5 - noise
    lps: list[float | None] = [None] + [math.log(p)] * (len(ids) - 1)
    tops: list[dict[str, float] | None] = [None] + [{str(t): math.log(p), "alt": math.log(0.3)} for t in ids[1:]]
    return {"tokens": [str(t) for t in ids] + ["x"], "token_logprobs": lps + [-1.0],
            "top_logprobs": tops + [{"x": -1.0}], "text_offset": list(range(len(ids) + 1))}


class FakeServer:
    def __init__(self, noise: float = 0.0, reply: str = "Answer: A") -> None:
        self.noise, self.reply = noise, reply
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _send(self, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._send({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
                           if self.path == "/v1/models" else {})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                if self.path == "/v1/completions":
                    self._send({"choices": [{"text": "x", "index": 0, "finish_reason": "length",
                                             "logprobs": fake_logprobs(body["prompt"], owner.noise)}]})
                else:
                    self._send({"choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": owner.reply}}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
