"""What a request asks for, what the engine tells about it, and its state while it runs."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

PENDING = -1  # a token id placeholder: sampled by a launched step, not yet on the host


class RequestError(ValueError):
    """A request the engine refuses; the message goes back to the client as is."""


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0 = off
    seed: int | None = None


@dataclass(frozen=True)
class GenerateParams:
    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    sampling: SamplingOptions = SamplingOptions()
    top_logprobs: int = 0  # alternatives per token
    return_logprobs: bool = False
    prompt_logprobs: bool = False

    def validate(self, vocab_size: int, context_length: int, capacity_tokens: int) -> None:
        n = len(self.input_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= context_length:
            raise RequestError(f"the prompt has {n} tokens; the context length is {context_length}")
        if n + 1 > capacity_tokens:
            raise RequestError(f"the prompt has {n} tokens; the KV cache holds {capacity_tokens}")
        bad = next((t for t in self.input_ids if t >= vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (size {vocab_size})")
        if self.max_new_tokens <= 0:
            raise RequestError("max_new_tokens must be at least 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise RequestError("min_new_tokens must not exceed max_new_tokens")
        s = self.sampling
        if not math.isfinite(s.temperature) or s.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {s.temperature}")
        if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {s.top_p}")
        if not 0 <= self.top_logprobs <= 20:
            raise RequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")


@dataclass
class TokenLogprob:
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """One message to the client: new tokens, and on the last one the finish reason and usage."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None  # the engine failed this request (a bug, not bad input)

    def followed_by(self, later: Event) -> Event:
        """One event saying what this one and then `later` say."""
        return replace(later, token_ids=self.token_ids + later.token_ids, logprobs=self.logprobs + later.logprobs,
                       prompt_logprobs=self.prompt_logprobs + later.prompt_logprobs)


Sink = Callable[[Event], None]


class Sequence:
    """A request inside the engine. token_ids holds prompt and output; `cached` counts the leading
    tokens whose K/V are in the pool. Running sequences keep cached == len(token_ids) - 1."""

    def __init__(self, params: GenerateParams, sink: Sink, order: int) -> None:
        self.params = params
        self.sink = sink
        self.order = order  # admission order: the newest is preempted first
        self.token_ids = list(params.input_ids)
        self.num_prompt = len(params.input_ids)
        self.pages: list[int] = []
        self.cached = 0
        self.window_row: int | None = None  # ring row of the pool's bf16 window, held with the pages
        self.window_start = 0  # first position this admission computed: the ring's window holds nothing before it
        self.restored_sinks = False  # the prefix cache put this admission's bf16 sinks into its ring row
        self.cached_prompt = 0  # prompt tokens found in the prefix cache at the first admission
        self.finished = False  # the last event was sent
        self.prompt_logprobs: list[TokenLogprob] | None = [] if params.prompt_logprobs else None
        self.generator: torch.Generator | None = None
        if params.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(params.sampling.seed)

    @property
    def id(self) -> str:
        return self.params.request_id

    @property
    def num_output(self) -> int:
        """Output tokens known on the host (a launched step's token counts once it arrives)."""
        return len(self.token_ids) - self.num_prompt - (self.token_ids[-1] == PENDING)

    @property
    def ring_holds_sinks(self) -> bool:
        """The ring row holds the bf16 sinks (or will, as they are computed): this admission computed them from
        the first token, or the prefix cache put them back."""
        return self.window_row is not None and (self.window_start == 0 or self.restored_sinks)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True until the first output token is sent: a recompute after preemption skips them."""
        return self.prompt_logprobs is not None and self.num_output == 0

    def remaining_tokens(self) -> int:
        """Tokens still to prefill plus outputs still to come: the load this request puts on a worker."""
        return len(self.token_ids) - self.cached + self.params.max_new_tokens - self.num_output
