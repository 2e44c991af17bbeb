"""A small real OpenAI-style streaming server for tests: chunked SSE over HTTP/1.1 keep-alive.

It counts prompt tokens like a real server would: it renders a chat template around the user
content and tokenizes the whole string with the tokenizer it was given.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tokenizers import Tokenizer

TEMPLATE = "system\nYou are a test server.\nuser\n{content}\nassistant\n"


@dataclass
class FakeOptions:
    tokenizer: Tokenizer
    serve_tokenizer: bool = True  # GET /v1/tokenizer
    token_delay: float = 0.0  # s between output chunks
    first_token_delay: float = 0.0  # s before the first output chunk
    fail_every: int = 0  # every n-th streamed request answers HTTP 500
    include_usage: bool = True  # honour stream_options.include_usage
    midstream_error: bool = False  # an SSE error event after the first token, as a dying worker gives
    served: int = 0
    bodies: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prompt_tokens(self, content: str) -> int:
        return len(self.tokenizer.encode(TEMPLATE.format(content=content), add_special_tokens=False).ids)


def _handler(opts: FakeOptions) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _json(self, status: int, obj: object) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            elif self.path == "/v1/tokenizer" and opts.serve_tokenizer:
                self._json(200, json.loads(opts.tokenizer.to_str()))
            else:
                self._json(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][-1]["content"]
            n_in = opts.prompt_tokens(content)
            n_out = int(body.get("max_tokens") or 16)
            if not body.get("ignore_eos"):
                n_out = min(n_out, 3)
            usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
            if not body.get("stream"):
                msg = {"role": "assistant", "content": "w " * n_out}
                self._json(200, {"choices": [{"index": 0, "message": msg, "finish_reason": "length"}], "usage": usage})
                return
            with opts.lock:
                opts.served += 1
                opts.bodies.append(body)
                fail = opts.fail_every and opts.served % opts.fail_every == 0
            if fail:
                self._json(500, {"error": {"message": "injected failure", "type": "server_error"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            time.sleep(opts.first_token_delay)
            for i in range(n_out):
                if i:
                    time.sleep(opts.token_delay)
                fin = "length" if i == n_out - 1 else None
                self._event({"choices": [{"index": 0, "delta": {"content": "w "}, "finish_reason": fin}]})
                if opts.midstream_error:
                    self._event({"error": {"message": "worker died", "type": "server_error"}})
                    break
            if opts.include_usage and (body.get("stream_options") or {}).get("include_usage"):
                self._event({"choices": [], "usage": usage})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _event(self, obj: dict) -> None:
            self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


class FakeServer:
    def __init__(self, opts: FakeOptions) -> None:
        self.opts = opts
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(opts))
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # clients closing keep-alive sockets is not news
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
