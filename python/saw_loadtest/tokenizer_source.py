"""Where the served model's tokenizer comes from: a file the user gives, or the server itself."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from . import openai_http

TOKENIZER_PATH = "/v1/tokenizer"  # saw-router: the worker's tokenizer JSON (HF `tokenizers` format)


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def fetch_tokenizer(base: str, api_key: str | None = None) -> Tokenizer | None:
    """GET /v1/tokenizer; None when the server has no such endpoint (then we probe instead)."""
    try:
        status, raw = openai_http.get(base + TOKENIZER_PATH, api_key, timeout=60.0)
    except OSError:
        return None
    if status != 200:
        return None
    try:
        obj = json.loads(raw)
        # Either the tokenizer.json itself, or wrapped as {"tokenizer_json": "<json text>"}.
        text = obj["tokenizer_json"] if isinstance(obj, dict) and "tokenizer_json" in obj else raw.decode()
        return Tokenizer.from_str(text)
    except Exception:  # not a tokenizer: treat as absent
        return None
