"""SGLang plugin (entry point `sglang.srt.plugins: saw`): `--attention-backend saw` with saw's KV pool.

SGLang loads general plugins in every process it starts (the engine's, the scheduler's) before it builds its
server args. This one:

- registers the attention backend `saw` (SGLang's own registry and choices list), and
- hooks two ModelRunner steps, through SGLang's HookRegistry, only when that backend is chosen:
  the per-token KV bytes SGLang sizes its pool by (saw's format, not the bf16 it would assume), and the pool
  class `_init_pools` builds (SawKVPool where it would build MHATokenToKVPool). SGLang has no extension point
  for a KV pool of its own format; these two are the smallest patch, applied at runtime;
- and, with that backend, gives the scheduler's GrammarManager its grammar backend when SGLang does not tokenize
  (skip_tokenizer_init, as saw's worker runs it: the router tokenizes), where SGLang would build none and abort
  every structured-output request. The backend (xgrammar) is built as SGLang builds it, from the tokenizer
  folder the worker passes as tokenizer_path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from saw_sglang.config import BACKEND, spec_from_env

_MIXIN = "sglang.srt.model_executor.model_runner_kv_cache_mixin"
_CONFIGURATOR = "sglang.srt.model_executor.pool_configurator"
_GRAMMAR = "sglang.srt.constrained.grammar_manager.GrammarManager"


def register() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    register_attention_backend(BACKEND)(_create_backend)
    if BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND])
    HookRegistry.register(f"{_CONFIGURATOR}.DefaultPoolConfigurator._compute_cell_size", _cell_size, HookType.AROUND)
    HookRegistry.register(f"{_MIXIN}.ModelRunnerKVCacheMixin._init_pools", _init_pools, HookType.AROUND)
    HookRegistry.register(f"{_GRAMMAR}.__init__", _grammar_backend, HookType.AFTER)


def _create_backend(runner: Any) -> Any:
    from saw_sglang.backend import SawAttentionBackend

    return SawAttentionBackend(runner)


def _uses_saw(args: Any) -> bool:
    chosen = {args.attention_backend, args.prefill_attention_backend, args.decode_attention_backend} - {None}
    if BACKEND in chosen and chosen != {BACKEND}:
        raise ValueError("--attention-backend saw serves prefill and decode both (saw's pool holds saw's format)")
    return BACKEND in chosen


def _cell_size(original: Callable[..., int], configurator: Any, runner: Any, num_layers: int) -> int:
    if not _uses_saw(runner.server_args):
        return original(configurator, runner, num_layers)
    from sglang.srt.layers.dp_attention import get_attention_tp_size

    from saw_worker.kv.pool import bytes_per_token

    cfg = runner.model_config
    if runner.use_mla_backend or runner.is_hybrid_swa or runner.mambaish_config:
        raise ValueError("saw's KV pool serves models with plain multi-head / grouped-query attention only")
    return bytes_per_token(spec_from_env().format(cfg.head_dim), num_layers, cfg.get_num_kv_heads(
        get_attention_tp_size()))


def _init_pools(original: Callable[..., None], runner: Any) -> None:
    if not _uses_saw(runner.server_args):
        return original(runner)
    from saw_sglang.pool import SawKVPool

    with _swapped(importlib.import_module(_MIXIN), "MHATokenToKVPool", SawKVPool):
        return original(runner)


def _grammar_backend(result: None, manager: Any, scheduler: Any) -> None:
    args = manager.server_args
    if manager.grammar_backend is not None or not args.skip_tokenizer_init or not _uses_saw(args):
        return result
    from sglang.srt.constrained.base_grammar_backend import create_grammar_backend
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    cfg = scheduler.model_config
    tokenizer = get_tokenizer(args.tokenizer_path, tokenizer_mode=args.tokenizer_mode,
                              trust_remote_code=args.trust_remote_code, revision=args.revision,
                              tokenizer_backend=args.tokenizer_backend)
    manager.grammar_backend = create_grammar_backend(args, tokenizer, cfg.vocab_size, cfg.hf_eos_token_id,
                                                     think_end_id=cfg.think_end_id)
    return result


@contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    kept = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, kept)
