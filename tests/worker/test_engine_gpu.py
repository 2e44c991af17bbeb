"""The engine on CUDA with the Triton kernels: graphs replay what eager decode computes, batching and
preemption do not change greedy tokens, and the kernels' outputs stay close to the CPU reference."""

from __future__ import annotations

import pytest
import torch
from engine_util import decode_batch, prompt, run, tiny_engine

from saw_worker.engine.request import GenerateParams

pytestmark = pytest.mark.gpu

REQUESTS = [GenerateParams(f"r{i}", prompt(i, n), max_new_tokens=24, ignore_eos=True)
            for i, n in enumerate([1, 5, 17, 30, 9, 64, 3])]


@pytest.mark.parametrize("kv,fmt_kw", [("bf16", {}), ("int4", {}), ("int4-bdr", {}),
                                         ("int4-bdr", {"window": 4, "sinks": 2})])
def test_graphs_match_eager_and_batching_is_invisible(kv: str, fmt_kw: dict[str, int]) -> None:
    """Graphs with overlapped steps (tokens fed on the device) against eager synchronous steps; with a window the
    decode kernel's ring reads the graph's prefix_lens buffer. The prefix cache is off: a rerun would find its
    prompt cached, and the extend kernel attends to a cached INT4 prefix where a whole-prompt prefill attends to
    the same tokens at bf16 (docs/worker.md)."""
    eager = tiny_engine(kv, device="cuda", num_pages=512, overlap=False, prefix_cache=False, **fmt_kw)
    graphs = tiny_engine(kv, device="cuda", num_pages=512, cuda_graphs=True, prefix_cache=False, **fmt_kw)
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


@torch.inference_mode()
def test_a_replay_reads_its_own_inputs_while_the_gpu_is_behind() -> None:
    """Two graph replays queued behind a busy stream: the host writes the second step's pinned inputs before the
    first step's copies have run, as the overlap loop does. Each gives what it gives alone, so the second did not
    overwrite the host buffers the first one's copies read (engine/pinned_inputs.py)."""
    engine = tiny_engine("int4-bdr", device="cuda", num_pages=64, max_running=8, cuda_graphs=True)
    try:
        runner = engine.runner
        graphs = runner.graphs
        assert graphs is not None
        a = decode_batch(runner.pool, [5, 9, 2])
        b = decode_batch(runner.pool, [7, 3, 11])
        want_a = graphs.run(a).clone()
        want_b = graphs.run(b).clone()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of a busy stream: both steps' copies wait behind it
        got_a = graphs.run(a).clone()
        got_b = graphs.run(b).clone()
        torch.cuda.synchronize()
    finally:
        engine.shutdown()
    assert not torch.equal(want_a, want_b)
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
