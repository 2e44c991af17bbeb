"""A small OpenAI-API client on urllib (no extra dependency), for saw-router or any compatible server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class APIError(RuntimeError):
    pass


class Client:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0) -> None:
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout = api_key, timeout
        self.model = model or self.first_model()

    def _req(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read() or b"{}")
            except urllib.error.HTTPError as e:
                if e.code in (429, 503) and attempt < 4:  # admission full: the router says when to retry
                    time.sleep(float(e.headers.get("Retry-After") or 1))
                    continue
                raise APIError(f"{method} {path}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None
        raise AssertionError("unreachable")

    def first_model(self) -> str:
        models = self._req("GET", "/v1/models").get("data") or []
        if not models:
            raise APIError("the server lists no model; pass --served-model")
        return str(models[0]["id"])

    def healthy(self) -> bool:
        try:
            self._req("GET", "/health")
            return True
        except (OSError, APIError, json.JSONDecodeError):
            return False

    def prompt_logprobs(self, ids: list[int], top_k: int) -> dict[str, Any]:
        """Legacy logprobs over prompt (+ 1 generated token): {tokens, token_logprobs, top_logprobs}."""
        body = {"model": self.model, "prompt": ids, "echo": True, "logprobs": top_k, "max_tokens": 1,
                "temperature": 0.0}
        out = self._req("POST", "/v1/completions", body)
        lp = out["choices"][0].get("logprobs")
        if not lp or len(lp.get("token_logprobs") or []) < len(ids):
            raise APIError("the server did not return prompt logprobs (needs echo + logprobs support)")
        return lp

    def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> tuple[str, str | None]:
        """(content, finish_reason) of one non-streaming chat completion."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        ch = self._req("POST", "/v1/chat/completions", body)["choices"][0]
        return ch["message"].get("content") or "", ch.get("finish_reason")
