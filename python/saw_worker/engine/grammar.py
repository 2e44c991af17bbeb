"""Structured output: JSON (any object, or a schema), regular expressions, EBNF grammars and fixed choices,
through xgrammar, the grammar engine vLLM and SGLang use (llguidance is the other maintained one; xgrammar
was picked for its token-bitmask API, which fits a batched sampler, and its compiled-grammar cache).

Each request with a grammar gets a matcher at submit (compiling there, off the engine thread; a bad schema
is a RequestError). Each step the sampler fills the rows' token bitmasks from their matchers and masks the
logits (`GrammarMasks`); the drawn tokens go back to the matchers at the next step (`defer_accept`), on the
host before that step's mask, so such requests never run in overlapped decode steps (ModelRunner.can_launch).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from saw_worker.engine.pinned_inputs import download, upload
from saw_worker.engine.request import GRAMMAR_KINDS, GrammarSpec, RequestError, Sequence

if TYPE_CHECKING:
    import xgrammar as xgr


class Grammars:
    """Compiles grammars for one tokenizer (built at the first grammar request: xgrammar and the tokenizer
    vocabulary load once) and hands out matchers."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None

    def _get_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            try:
                import xgrammar as xgr
                from tokenizers import Tokenizer
                from transformers import PreTrainedTokenizerFast
            except ImportError as exc:
                raise RequestError(f"structured output needs xgrammar on the worker ({exc})") from exc
            try:
                hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self._tokenizer_json))
            except Exception as exc:
                raise RequestError(f"structured output needs the model's tokenizer, which did not load: {exc}") \
                    from exc
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        return self._compiler

    def matcher(self, grammar: GrammarSpec) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        compiler = self._get_compiler()
        try:
            # JSON without free whitespace: small models otherwise loop on newlines until max_tokens
            if grammar.kind == "json_object":  # OpenAI's JSON mode: an object (the builtin grammar takes any value)
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif grammar.kind == "json_schema":
                compiled = compiler.compile_json_schema(grammar.spec, any_whitespace=False, strict_mode=grammar.strict)
            elif grammar.kind == "regex":
                compiled = compiler.compile_regex(grammar.spec)
            elif grammar.kind == "ebnf":
                compiled = compiler.compile_grammar(grammar.spec)
            elif grammar.kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(json.loads(grammar.spec)))
            else:
                raise RequestError(f"unknown grammar kind {grammar.kind!r}; one of {', '.join(GRAMMAR_KINDS)}")
        except RequestError:
            raise
        except Exception as exc:  # xgrammar reports bad schemas, regexes and grammars as RuntimeError
            raise RequestError(f"the {grammar.kind.replace('_', ' ')} does not compile: {exc}") from exc
        return xgr.GrammarMatcher(compiled)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly the choices (JSON string escapes are EBNF's too)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise RequestError("a choice grammar needs a list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _constrained(seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(seqs) if s.matcher is not None and not s.matcher.is_terminated()]


class GrammarMasks:
    """Masks a step's constrained rows, keeping the host work off the critical path: the matchers take the
    previous step's drawn tokens and fill one host bitmask together on xgrammar's threads while the device runs
    this step's forward, and one launch applies the bitmask to the logits."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._bitmask: torch.Tensor | None = None  # int32 [rows, ceil(V / 32)], pinned on CUDA, grown as needed
        self._filler: xgr.BatchGrammarMatcher | None = None
        # the last step's drawn tokens on their way to the host: (matchers, host tokens, copy-done event)
        self._pending: tuple[list[xgr.GrammarMatcher], torch.Tensor, torch.cuda.Event | None] | None = None

    def _host_bitmask(self, rows: int, vocab: int) -> torch.Tensor:
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < rows or self._bitmask.shape[1] != words:
            self._bitmask = torch.empty(max(rows, 2 * (0 if self._bitmask is None else len(self._bitmask))), words,
                                        dtype=torch.int32, pin_memory=self._device.type == "cuda")
        return self._bitmask[:rows]

    def accept_pending(self) -> None:
        """Advance the matchers by the tokens `defer_accept` holds (their copy ended with the step that drew
        them, so this does not wait for the device's current work)."""
        if self._pending is None:
            return
        import xgrammar as xgr

        matchers, tokens, copied = self._pending
        self._pending = None
        if copied is not None:
            copied.synchronize()
        xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens.tolist())

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Set to -inf, in place, every token a row's grammar does not allow next. The bitmask's copy to the
        device may still be in flight when this returns; grammar steps are synchronous (the engine reads their
        tokens), which ends it before the next step refills the buffer."""
        self.accept_pending()
        rows = _constrained(seqs)
        if not rows:
            return
        import xgrammar as xgr

        if self._filler is None:
            self._filler = xgr.BatchGrammarMatcher(max_threads="auto")
        bitmask = self._host_bitmask(len(seqs), logits.shape[-1])
        self._filler.batch_fill_next_token_bitmask([seqs[i].matcher for i in rows], bitmask, indices=rows)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)

    def defer_accept(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Queue the drawn tokens of the constrained rows for their matchers, taken at the next `apply` (or
        `accept_pending`)."""
        rows = _constrained(seqs)
        if not rows:
            return
        host, copied = download(tokens[upload(rows, torch.int64, tokens.device)])
        self._pending = [seqs[i].matcher for i in rows], host, copied
