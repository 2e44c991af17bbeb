"""What a request asks for, what the engine tells about it, and its state while it runs."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher


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
    min_p: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0  # OpenAI's: logit -= f x (times generated)
    presence_penalty: float = 0.0  # OpenAI's: logit -= p if generated
    repetition_penalty: float = 1.0  # 1 = off; prompt and output tokens: logit / r if > 0, else x r
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def penalizes(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1

    def check(self, vocab_size: int) -> None:
        """RequestError for a value outside its range (the router checks them too; a worker is reachable alone)."""
        bad = RequestError
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise bad(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise bad(f"logit_bias: token id {token} is outside the vocabulary (size {vocab_size})")
            if not -100 <= bias <= 100:
                raise bad(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}")


GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "ebnf", "choice")


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match (grammar.py compiles it)."""

    kind: str  # one of GRAMMAR_KINDS
    spec: str = ""  # the schema (JSON text), regex, EBNF, or the choices (a JSON list of strings)
    strict: bool = False  # json_schema: no properties beyond those the schema names


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
    grammar: GrammarSpec | None = None

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
        self.sampling.check(vocab_size)
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
    error: str | None = None  # the engine failed this request (a bug, not bad input, unless refused)
    refused: bool = False  # the engine process refused it as bad input (RequestError), error says why

    def followed_by(self, later: Event) -> Event:
        """One event saying what this one and then `later` say."""
        return replace(later, token_ids=self.token_ids + later.token_ids, logprobs=self.logprobs + later.logprobs,
                       prompt_logprobs=self.prompt_logprobs + later.prompt_logprobs)


Sink = Callable[[Event], None]


class Sequence:
    """A request inside the engine. token_ids holds prompt and output tokens known on the host; `cached` counts
    the leading tokens whose K/V are in the pool. With overlapped decode the next token can exist on the device
    only: sampled by the launched step, in its row `launched_row`, until that step's tokens reach the host.
    num_tokens counts it; running sequences keep cached == num_tokens - 1."""

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
        self.launched_row: int | None = None  # row of the launched step that sampled the next token, not yet here
        self.finished = False  # out of the scheduler (finished, aborted or failed); its last event goes out at once
        self.prompt_logprobs: list[TokenLogprob] | None = [] if params.prompt_logprobs else None
        self.generator: torch.Generator | None = None
        if params.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(params.sampling.seed)
        self.penalty_row: int | None = None  # its row of the sampler's PenaltyTable, from the first sample on
        self.matcher: GrammarMatcher | None = None  # the grammar's state (grammar.py), set at submit

    @property
    def id(self) -> str:
        return self.params.request_id

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, the one a launched step sampled included (its position is taken)."""
        return len(self.token_ids) + (self.launched_row is not None)

    @property
    def num_output(self) -> int:
        """Output tokens known on the host (a launched step's token counts once it arrives)."""
        return len(self.token_ids) - self.num_prompt

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
        return self.num_tokens - self.cached + self.params.max_new_tokens - self.num_output
