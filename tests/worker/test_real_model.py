"""smollm2-135m through the real engine on CPU: a factual answer, and int4-bdr stays close to bf16."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import tokenizers
import torch
from engine_util import Collector

from saw_worker.builder import build_engine
from saw_worker.engine.engine import LocalEngine
from saw_worker.engine.request import GenerateParams
from saw_worker.options import KVOptions, ModelOptions, PoolOptions, WorkerOptions

pytestmark = pytest.mark.slow


def engine_for(kv: str, **levers: bool | int) -> LocalEngine:
    return build_engine(WorkerOptions(model=ModelOptions(name="smollm2-135m"), kv=KVOptions(name=kv, **levers),
                                      pool=PoolOptions(kv_cache_memory=64 << 20)))


def encode(engine: LocalEngine, text: str) -> list[int]:
    tok = tokenizers.Tokenizer.from_str(engine.info().tokenizer.tokenizer_json)
    return tok.encode(text, add_special_tokens=False).ids


def test_int4_bdr_answers_a_factual_question() -> None:
    engine = engine_for("int4-bdr")
    # SmolLM2's chat template, rendered (the router renders it in production).
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
            "<|im_start|>assistant\n")
    engine.start()
    try:
        sink = Collector()
        engine.submit(GenerateParams("q", encode(engine, chat), max_new_tokens=16), sink)
        tokens = sink.wait()
    finally:
        engine.shutdown()
    tok = tokenizers.Tokenizer.from_str(engine.info().tokenizer.tokenizer_json)
    assert "Paris" in tok.decode(tokens)


def test_int4_bdr_next_token_distribution_stays_close_to_bf16() -> None:
    """Mean KL(bf16 || format) over 1024 tokens of Python source (textwrap.py from the stdlib).

    Measured on 2026-11-23: int4 0.138 nats, int4-bdr (b=64) 0.065, so BDR halves plain INT4's
    divergence on this model. The bound 0.1 sits between the two: it fails if rotation stops helping.
    One prefill with the window on reads every token at bf16 (KL 0), so the window and the K scale are
    off here: each token reads all K/V before it from INT4 (tests/eval checks the levers decode-time).
    """
    text = Path(textwrap.__file__).read_text()[:6000]
    logp = {}
    for kv in ("bf16", "int4", "int4-bdr"):
        engine = engine_for(kv, window=0, k_scale=False)
        logp[kv] = engine.runner.score(encode(engine, text)[:1024]).log_softmax(-1)
    ref = logp["bf16"]

    def kl(kv: str) -> float:
        return (ref.exp() * (ref - logp[kv])).sum(-1).mean().item()

    assert kl("int4-bdr") < 0.1
    assert kl("int4-bdr") < kl("int4")
    assert (ref.argmax(-1) == logp["int4-bdr"].argmax(-1)).float().mean().item() > 0.8
    assert torch.isfinite(ref).all()
