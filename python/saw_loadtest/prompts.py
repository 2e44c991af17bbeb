"""Prompts whose chat request is exactly N tokens as the server counts them (usage.prompt_tokens).

Two ways to get there:
- TokenizerPrompts: with the served model's tokenizer.json we cut the corpus token stream at any
  length and re-count locally; the chat template's fixed overhead is measured once on the server
  (`calibrate_overhead`) and subtracted. Fast, works for any length and any number of prompts.
- ProbePrompts: without a tokenizer, ask the server to count (max_tokens=1 requests) and search
  the cut point; exact too, but costs a few requests per distinct prompt, so pools are small.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from .scenarios import Scenario

CountPrompt = Callable[[str], int]  # content text -> usage.prompt_tokens of a chat request with it
_STRIDE = 7919  # prime step between start tokens, so consecutive prompts share no prefix


class PromptSource(Protocol):
    def prompt(self, total_tokens: int, index: int) -> str: ...


class TemplateTooLong(ValueError):
    """The chat template alone already has at least the requested number of tokens."""


class TokenizerPrompts:
    """Exact-length prompts from the corpus counted with the model's own tokenizer."""

    def __init__(self, tokenizer: Tokenizer, corpus: str, overhead: int = 0) -> None:
        self._tok = tokenizer
        self._ids = tokenizer.encode(corpus, add_special_tokens=False).ids
        self.overhead = overhead  # chat-template tokens around the content

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def text(self, n: int, start: int) -> str:
        """Text of exactly `n` tokens from the corpus token stream (repeated as needed) at `start`."""
        if n < 1:
            raise ValueError("n must be >= 1")
        for shift in range(16):
            length = n
            for _ in range(12):
                text = self._window(start + shift, length)
                m = self.count(text)
                if m == n:
                    return text
                length = max(1, length + n - m)  # decode/re-encode drift is a few tokens at most
        raise RuntimeError(f"could not cut a {n}-token text at token {start}")

    def prompt(self, total_tokens: int, index: int) -> str:
        n = total_tokens - self.overhead
        if n < 1:
            raise TemplateTooLong(f"{total_tokens} tokens requested, chat template alone takes {self.overhead}")
        return self.text(n, index * _STRIDE)

    def _window(self, start: int, length: int) -> str:
        ids, size = self._ids, len(self._ids)
        start %= size
        reps = (start + length) // size + 1
        window = (ids * reps)[start : start + length]
        # strip(): some chat templates trim the content, so leading/trailing space must not count.
        return self._tok.decode(window, skip_special_tokens=True).strip()


def calibrate_overhead(prompts: TokenizerPrompts, count_prompt: CountPrompt) -> int:
    """Template overhead = server count - local count, checked at two lengths (a wrong tokenizer fails)."""
    overheads = set()
    for n in (16, 61):
        overheads.add(count_prompt(prompts.text(n, 0)) - n)
    if len(overheads) != 1:
        raise ValueError(f"tokenizer disagrees with the server (template overheads {sorted(overheads)})")
    prompts.overhead = overheads.pop()
    return prompts.overhead


class ProbePrompts:
    """Exact-length prompts found by asking the server for usage.prompt_tokens of candidate cuts."""

    def __init__(self, count_prompt: CountPrompt, corpus: str, distinct: int = 16) -> None:
        self.count_prompt = count_prompt
        self._corpus = corpus
        self._lines = [0] + [i + 1 for i, c in enumerate(corpus[:-1]) if c == "\n" and corpus[i + 1] != "\n"]
        self.distinct = distinct  # prompts per length; beyond that they repeat (each costs probes)
        self.probes = 0
        self._found: dict[tuple[int, int], str] = {}
        self._model: tuple[float, float] | None = None

    def prompt(self, total_tokens: int, index: int) -> str:
        key = (total_tokens, index % self.distinct)
        if key not in self._found:
            self._found[key] = self._search(total_tokens, key[1] * 37)
        return self._found[key]

    def _cut(self, line: int, k: int) -> str:
        start = self._lines[line % len(self._lines)]
        reps = (start + k) // len(self._corpus) + 1
        return (self._corpus * reps)[start : start + k].strip()

    def _measure(self, text: str) -> int:
        self.probes += 1
        return self.count_prompt(text)

    def _search(self, total: int, line: int) -> str:
        for attempt in range(8):
            text = self._search_from(total, line + attempt)
            if text is not None:
                return text
        raise RuntimeError(f"no cut of the corpus gives a {total}-token prompt")

    def _linear_model(self) -> tuple[float, float]:
        """(template overhead, chars per token) from two probes, so first guesses land close:
        a wild first guess could be a prompt over the context length."""
        if self._model is None:
            m1, m2 = self._measure(self._cut(0, 256)), self._measure(self._cut(0, 1024))
            cpt = 768 / max(1, m2 - m1)
            self._model = (m1 - 256 / cpt, cpt)
        return self._model

    def _search_from(self, total: int, line: int) -> str | None:
        # Bracketed secant on the character count k; counts grow by about one token per `cpt` chars.
        overhead, cpt = self._linear_model()
        lo, hi = (0, None), (None, None)  # (k, tokens) with tokens < total, and with tokens > total
        k = max(1, round((total - overhead) * cpt))
        for _ in range(48):
            m = self._measure(self._cut(line, k))
            if m == total:
                return self._cut(line, k)
            if m < total:
                lo = (k, m)
            else:
                hi = (k, m)
                if k == 1:
                    raise TemplateTooLong(f"{total} tokens requested, template plus one char takes {m}")
            if hi[0] is not None and lo[1] is not None:
                if hi[0] - lo[0] <= 1:
                    return None  # the count jumps past `total` at this cut: try another start
                cpt = (hi[0] - lo[0]) / (hi[1] - lo[1])
            guess = round(k + (total - m) * cpt)
            if hi[0] is None:
                k = max(guess, k + 1)
            else:
                k = guess if lo[0] < guess < hi[0] else (lo[0] + hi[0]) // 2
        return None


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    input_tokens: int
    output_tokens: int


def build_pool(
    scenario: Scenario, count: int, source: PromptSource, *, seed: int, first_index: int = 0
) -> list[PromptItem]:
    """`count` requests drawn from `scenario`; prompt i uses corpus position `first_index + i`."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        n_in, n_out = scenario.sample(rng)
        items.append(PromptItem(source.prompt(n_in, first_index + i), n_in, n_out))
    return items


def write_pool(path: Path, items: Iterable[PromptItem]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"prompt": it.prompt, "in": it.input_tokens, "out": it.output_tokens}) + "\n")


def read_pool(path: Path, part: int = 0, parts: int = 1) -> Iterator[PromptItem]:
    """Items part, part+parts, ... so that several Locust processes share one file without overlap."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % parts == part and line.strip():
                d = json.loads(line)
                yield PromptItem(d["prompt"], d["in"], d["out"])
