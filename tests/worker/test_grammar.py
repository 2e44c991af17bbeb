"""Structured output (grammar.py): random logits sampled under a grammar always give text it accepts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from saw_worker.engine.grammar import Grammars
from saw_worker.engine.request import GenerateParams, GrammarSpec, RequestError, SamplingOptions, Sequence
from saw_worker.engine.sampler import Sampler

pytest.importorskip("xgrammar")

EOS = "<|end|>"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"]}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer (every byte is a token, as in GPT-2 style vocabularies) and an end token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps({"name": "ann", "age": 31, "ok": True}), '{"a": [1, 2.5, null, "x y"]}', "yes no maybe"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def generate(tokenizer: Tokenizer, grammar: GrammarSpec, seed: int, vocab: int = 416) -> str:
    """Sample (temperature 1, random logits: the grammar alone decides what is valid) until the end token."""
    eos = tokenizer.token_to_id(EOS)
    grammars = Grammars(tokenizer.to_str(), vocab, (eos,))
    seq = Sequence(GenerateParams("g", [1], max_new_tokens=64, grammar=grammar,
                                  sampling=SamplingOptions(temperature=1.0, seed=seed)), sink=lambda ev: None, order=0)
    seq.matcher = grammars.matcher(grammar)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    sample = Sampler(torch.device("cpu"))
    for _ in range(2000):
        token = int(sample(torch.randn(1, vocab, generator=g) * 4, [seq])[0])
        if token == eos:
            break
        out.append(token)
    sample.grammars.accept_pending()
    assert seq.matcher.is_terminated(), tokenizer.decode(out)
    return tokenizer.decode(out)


def loads(text: str) -> object:
    """JSON as xgrammar's grammars define it: they admit raw control characters inside strings (which JSON
    proper escapes), so random logits produce some; a model hardly ever does."""
    return json.loads(text, strict=False)


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_output_parses_and_matches_the_schema(tokenizer: Tokenizer, seed: int) -> None:
    value = loads(generate(tokenizer, GrammarSpec("json_schema", json.dumps(SCHEMA), strict=True), seed))
    assert isinstance(value, dict)
    assert set(value) == {"name", "age", "ok"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and isinstance(value["ok"], bool)


@pytest.mark.parametrize("seed", range(4))
def test_json_object_regex_and_choice(tokenizer: Tokenizer, seed: int) -> None:
    assert isinstance(loads(generate(tokenizer, GrammarSpec("json_object"), seed)), dict)
    assert re.fullmatch(r"[a-c]{2,4}-\d", generate(tokenizer, GrammarSpec("regex", r"[a-c]{2,4}-\d"), seed))
    choices = ["yes", 'no "really"', "maybe"]
    assert generate(tokenizer, GrammarSpec("choice", json.dumps(choices)), seed) in choices


def test_bad_grammars_are_request_errors(tokenizer: Tokenizer) -> None:
    grammars = Grammars(tokenizer.to_str(), 416, (0,))
    for bad in (GrammarSpec("json_schema", "{not json"), GrammarSpec("regex", "a(b"), GrammarSpec("ebnf", "root ::="),
                GrammarSpec("choice", "[]"), GrammarSpec("yaml")):
        with pytest.raises(RequestError):
            grammars.matcher(bad)
    with pytest.raises(RequestError, match="tokenizer"):
        Grammars("{}", 416, (0,)).matcher(GrammarSpec("json_object"))
