"""The CPU decode forward compiled with torch.compile (inductor's C++ backend): one graph for all layers.

Eager decode on the CPU spends most of a step dispatching small ops (norms, RoPE, casts, views: ~2-15 us each, 30
layers); compiled, the ops between two projections are one generated C++ loop. The attention backend reads device
values on the host and mutates the paged pool, so it stays eager, behind an opaque custom op (`saw::attention`)
that calls the backend: dynamo traces the rest of the forward as one graph, without breaks. (Compiling the
reference attention's arithmetic too, as graphs called from inside that op, measured slower: each call's guards
and argument marshalling cost more than its ~20 small ops.)

Shapes: decode rows are dynamic (one graph for 2..max rows, one for a single row: dynamo specialises size 1), so
both are compiled at startup (`warm_up`, without duck sizing) and a step never waits for a compile. Without a C++
compiler, or where compilation fails, `CompiledDecode.build` logs why and returns None: the runner stays eager.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .attention import Attention
from .linear import INT4_MAX_ROWS

log = logging.getLogger("saw_worker")

# cpp_wrapper: the graph's kernels are called from generated C++, not Python (a step 15-20 % faster than the Python
# wrapper); no guards on the model's parameters: they are checked once per call (1.5 ms a step), and never change.
_OPTIONS = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}

_running: list[Attention] = []  # the attention of the compiled forward that runs now (innermost last)


@torch.library.custom_op("saw::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, layer_id: int) -> Tensor:
    return _running[-1](layer_id, q, k, v)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, layer_id: int) -> Tensor:
    return torch.empty_like(q)


def _opaque_attention(layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attention_op(q, k, v, layer_id)


class CompiledDecode:
    """model.forward compiled for decode steps of 1..max_rows rows (CPU only), calling `attention` (eagerly)."""

    def __init__(self, model: torch.nn.Module, attention: Attention, max_rows: int = INT4_MAX_ROWS) -> None:
        self.model = model
        self.attention = attention
        self.max_rows = max_rows
        self._forward: Callable[..., Tensor] = torch.compile(model.forward, dynamic=True, options=_OPTIONS)

    @classmethod
    def build(cls, model: torch.nn.Module, attention: Attention, warm_up: Callable[[CompiledDecode], None]
              ) -> CompiledDecode | None:
        """A compiled forward, warmed up by `warm_up` (which runs it at every compiled shape), or None where
        torch.compile cannot serve: the reason is logged and decode stays eager."""
        if shutil.which("g++") is None and shutil.which("c++") is None:
            log.warning("no C++ compiler (g++) found: CPU decode runs eagerly (slower); install g++ to compile it")
            return None
        started = time.perf_counter()
        try:
            compiled = cls(model, attention)
            # the warm-up traces every graph; two sizes equal there (rows and a weight's dim) are no rule
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                warm_up(compiled)
        except Exception as e:  # any failure of dynamo / inductor / the C++ build
            log.warning("torch.compile of the CPU decode step failed, decode runs eagerly: %r", e)
            torch._dynamo.reset()
            return None
        log.info("compiled the CPU decode step (torch.compile, up to %d rows) in %.1fs", compiled.max_rows,
                 time.perf_counter() - started)
        return compiled

    def fits(self, rows: int) -> bool:
        return rows <= self.max_rows

    def __call__(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        _running.append(self.attention)
        try:
            return self._forward(input_ids, positions, _opaque_attention)
        finally:
            _running.pop()
