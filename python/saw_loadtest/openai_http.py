"""Blocking helpers the sweep driver uses outside Locust: readiness, model id, token counting."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class ServerError(RuntimeError):
    pass


def _request(url: str, body: dict | None, api_key: str | None, timeout: float) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str, api_key: str | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    return _request(url, None, api_key, timeout)


def post_json(url: str, body: dict, api_key: str | None = None, timeout: float = 600.0) -> dict:
    status, raw = _request(url, body, api_key, timeout)
    if status != 200:
        raise ServerError(f"POST {url}: HTTP {status}: {raw[:500].decode('utf-8', 'replace')}")
    return json.loads(raw)


def first_model(base: str, api_key: str | None = None) -> str:
    status, raw = get(f"{base}/v1/models", api_key)
    if status != 200:
        raise ServerError(f"GET /v1/models: HTTP {status}")
    data = json.loads(raw).get("data") or []
    if not data:
        raise ServerError("GET /v1/models lists no model")
    return data[0]["id"]


def wait_ready(base: str, timeout: float, api_key: str | None = None, alive=lambda: True) -> str:
    """Poll /health then /v1/models until both answer; return the model id."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not alive():
            raise ServerError(f"server exited while starting ({last})")
        try:
            status, _ = get(f"{base}/health", api_key, timeout=5.0)
            if status == 200:
                return first_model(base, api_key)
            last = f"/health HTTP {status}"
        except (OSError, ServerError, ValueError) as e:
            last = str(e)
        time.sleep(1.0)
    raise ServerError(f"server not ready after {timeout:g} s ({last})")


def prompt_counter(base: str, model: str, api_key: str | None = None):
    """usage.prompt_tokens of a chat request with this user content (max_tokens=1, cheap)."""

    def count(content: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
        reply = post_json(f"{base}/v1/chat/completions", body, api_key)
        return int(reply["usage"]["prompt_tokens"])

    return count
