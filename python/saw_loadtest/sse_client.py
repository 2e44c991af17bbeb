"""One streamed chat completion over plain HTTP (geventhttpclient), timed chunk by chunk.

No OpenAI SDK: it retries silently and hides per-chunk timing. Runs inside Locust's gevent
loop, and also outside it (tests), since geventhttpclient brings its own gevent sockets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import gevent
from geventhttpclient import HTTPClient

from .records import RequestRecord

CHAT_PATH = "/v1/chat/completions"


def make_client(base_url: str, timeout: float) -> HTTPClient:
    """One keep-alive connection per simulated user, as a real client would hold."""
    u = urlsplit(base_url)
    return HTTPClient(
        u.hostname or "127.0.0.1",
        port=u.port,
        ssl=u.scheme == "https",
        connection_timeout=min(timeout, 60.0),
        network_timeout=timeout,
        concurrency=1,
    )


def chat_body(model: str, prompt: str, max_tokens: int, temperature: float = 0.0) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Exactly `max_tokens` outputs: the scenario fixes output length.
        "ignore_eos": True,
    }


def stream_chat(
    client: HTTPClient,
    body: dict,
    rec: RequestRecord,
    *,
    timeout: float,
    api_key: str | None = None,
    path_prefix: str = "",
    clock: Callable[[], float] = time.perf_counter,
) -> RequestRecord:
    """Send `body`, fill `rec` in place. Never raises for request failures: they land in rec.error."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = json.dumps(body).encode()
    timer = gevent.Timeout(timeout)
    rec.send_ts = time.time()
    t0 = clock()
    timer.start()
    try:
        resp = client.post(path_prefix + CHAT_PATH, body=payload, headers=headers)
        rec.status = resp.status_code
        if rec.status != 200:
            text = resp.read().decode("utf-8", "replace")
            _fail(rec, "http", f"HTTP {rec.status}: {text[:500]}")
        else:
            _read_events(resp, rec, t0, clock)
    except gevent.Timeout as t:
        if t is not timer:
            raise
        _fail(rec, "timeout", f"no complete response within {timeout:g} s")
    except TimeoutError as e:  # socket-level: network_timeout between two reads
        _fail(rec, "timeout", f"network timeout: {e}")
    except Exception as e:  # connection refused/reset, parse errors: all count as failed requests
        _fail(rec, "connection", f"{type(e).__name__}: {e}")
    finally:
        timer.cancel()
        rec.end_s = clock() - t0
    return rec


def _fail(rec: RequestRecord, kind: str, message: str) -> None:
    if rec.error is None:  # keep the first cause
        rec.error, rec.error_kind = message, kind


def _read_events(resp, rec: RequestRecord, t0: float, clock: Callable[[], float]) -> None:
    saw_done = False
    while True:
        line = resp.readline(b"\n")
        if not line:
            break
        now = clock() - t0
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == b"[DONE]":
            saw_done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            _fail(rec, "stream", f"unparsable SSE data: {data[:200]!r}")
            continue
        if obj.get("error"):
            err = obj["error"]
            _fail(rec, "server", str(err.get("message", err) if isinstance(err, dict) else err)[:500])
            continue
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                if rec.first_content_s is None:
                    rec.first_content_s = now
                rec.chunk_s.append(now)
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
        usage = obj.get("usage")
        if usage:
            rec.usage_s = now
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens")
    if not saw_done:
        _fail(rec, "stream", "stream ended before data: [DONE]")
    elif rec.usage_s is None:
        _fail(rec, "stream", "no usage chunk (stream_options.include_usage ignored?)")
    elif rec.first_content_s is None:
        _fail(rec, "stream", "no non-empty content chunk")
