"""One line of the raw per-request JSONL, and reading/writing it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RequestRecord:
    """Everything measured about one request. Times after `send_ts` are seconds relative to it."""

    label: str  # KV config / server label of the run
    conc: int
    scenario: str
    expected_in: int
    expected_out: int
    send_ts: float = 0.0  # wall clock (epoch seconds) when the request was sent
    first_content_s: float | None = None  # first chunk with non-empty content -> TTFT
    usage_s: float | None = None  # chunk that carried usage -> E2E
    end_s: float | None = None  # stream closed ([DONE] or error)
    chunk_s: list[float] = field(default_factory=list)  # every content chunk
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    status: int = 0  # HTTP status; 0 when no response came
    error: str | None = None  # None on success
    error_kind: str | None = None  # timeout | http | connection | stream | server
    proc: int = 0
    seq: int = 0  # request number within its process

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.first_content_s

    @property
    def e2e(self) -> float | None:
        return self.usage_s

    @property
    def end_ts(self) -> float:
        return self.send_ts + (self.end_s or 0.0)

    def to_json(self) -> str:
        d = asdict(self)
        d["chunk_s"] = [round(t, 6) for t in self.chunk_s]
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


def read_records(paths: Iterable[Path]) -> Iterator[RequestRecord]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield RequestRecord.from_dict(json.loads(line))
