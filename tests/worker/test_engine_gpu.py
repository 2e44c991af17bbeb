"""The engine on CUDA with the Triton kernels: graphs replay what eager decode computes, batching and
preemption do not change greedy tokens, and the kernels' outputs stay close to the CPU reference."""

from __future__ import annotations

import pytest
from engine_util import prompt, run, tiny_engine

from saw_worker.engine.request import GenerateParams

pytestmark = pytest.mark.gpu

REQUESTS = [GenerateParams(f"r{i}", prompt(i, n), max_new_tokens=24, ignore_eos=True)
            for i, n in enumerate([1, 5, 17, 30, 9, 64, 3])]


@pytest.mark.parametrize("kv", ["bf16", "int4", "int4-bdr"])
def test_graphs_match_eager_and_batching_is_invisible(kv: str) -> None:
    """Graphs with overlapped steps (tokens fed on the device) against eager synchronous steps. The prefix
    cache is off: a rerun would find its prompt cached, and the extend kernel attends to a cached INT4
    prefix where a whole-prompt prefill attends to the same tokens at bf16 (docs/worker.md)."""
    eager = tiny_engine(kv, device="cuda", num_pages=512, overlap=False, prefix_cache=False)
    graphs = tiny_engine(kv, device="cuda", num_pages=512, cuda_graphs=True, prefix_cache=False)
    try:
        want = run(eager, REQUESTS)
        got = run(graphs, REQUESTS)
        alone = {r.request_id: run(graphs, [r])[r.request_id] for r in REQUESTS[:3]}
    finally:
        eager.shutdown()
        graphs.shutdown()
    assert got == want
    assert all(alone[k] == got[k] for k in alone)


def test_preemption_on_gpu_finishes_everything() -> None:
    small = tiny_engine("int4-bdr", device="cuda", num_pages=24, prefill_budget=16, cuda_graphs=True)
    try:
        out = run(small, REQUESTS)
        assert small.scheduler.pages.free_pages == 23
    finally:
        small.shutdown()
    assert all(len(t) == 24 for t in out.values())
