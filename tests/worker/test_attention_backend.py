"""The attention backend's metadata (eager and decode-graph) and the graphs' double-buffered pinned inputs, on CPU:
the graph buffers a replay fills hold what an eager step would build, a stand-in for CUDA graphs (the model run
again on the captured metadata) gives the tokens of eager decode, and pinned host sets are rewritten only once
the copies that read them are done."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_util import TINY, decode_batch, prompt, run, tiny_engine

from saw_kv.formats import KVFormat
from saw_worker.engine.cuda_graphs import DecodeGraphs
from saw_worker.engine.pinned_inputs import PinnedInputs
from saw_worker.engine.request import GenerateParams
from saw_worker.kv.backend import AttentionBackend
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference_backend import ReferenceBackend


@pytest.mark.parametrize("window,sinks", [(0, 0), (4, 2)])
def test_replay_buffers_hold_the_eager_metadata_and_padding(window: int, sinks: int) -> None:
    """prepare_for_replay fills the graph buffers with what prepare() builds for the same rows (prefix_lens
    included: the decode kernel's ring reads it), and padded rows write nowhere and read one token."""
    fmt = KVFormat.make("int4-bdr", 64, window=window, sinks=sinks)
    pool = KVPool(fmt, 1, 2, num_pages=32, page_size=4, device=torch.device("cpu"), window_rows=4)
    backend = ReferenceBackend(pool, 0.125)
    h = decode_batch(pool, [5, 13, 2], [0, 6, 0])
    backend.prepare(h)
    eager = backend.layout
    backend.allocate_graph_buffers(max_batch=8, max_pages=6)
    backend.prepare_for_replay(h, batch_size=4)
    backend.prepare_for_capture(batch_size=4)
    graph = backend.layout
    assert eager is not None and graph is not None and graph.is_decode and eager.is_decode
    n, width = 3, eager.page_table.shape[1]
    for name in ("slots", "seq_lens", "prefix_lens", "cu_seqlens"):
        assert torch.equal(getattr(graph, name)[:n], getattr(eager, name)[:n]), name
    assert torch.equal(graph.page_table[:n, :width], eager.page_table)
    assert (graph.slots[n:].tolist(), graph.seq_lens[n:].tolist(), graph.prefix_lens[n:].tolist()) == ([-1], [1], [0])
    assert graph.page_table[n:, 0].tolist() == [0]
    if window:
        assert eager.window is not None and graph.window is not None
        for name in ("rows", "lens", "quant_lens", "slots", "sinks"):
            assert torch.equal(getattr(graph.window, name)[:n], getattr(eager.window, name)), name
        assert graph.window.rows[n:].tolist() == [pool.dump_row] and graph.window.slots[n:].tolist() == [pool.dump_slot]
        assert (graph.window.lens[n:].tolist(), graph.window.quant_lens[n:].tolist()) == ([0], [1])
    else:
        assert graph.window is None and eager.window is None


class EagerReplayBackend(ReferenceBackend):
    """The reference, declared capturable for EagerReplay (which captures nothing)."""

    supports_cuda_graphs = True


class EagerReplay:
    """Stands in for a captured graph on CPU: replay() runs the model again on the metadata a capture for
    batch_size records (views of the static buffers) and writes the graph's output buffer."""

    replays = 0

    def __init__(self, graphs: DecodeGraphs, batch_size: int) -> None:
        self.graphs, self.bs = graphs, batch_size

    def replay(self) -> None:
        g, bs = self.graphs, self.bs
        EagerReplay.replays += 1
        g.backend.prepare_for_capture(bs)
        g._hidden[bs].copy_(g.model(g._ids[:bs], g._positions[:bs]))  # noqa: SLF001


def with_eager_replay_graphs(engine, max_batch: int) -> None:  # noqa: ANN001
    runner = engine.runner
    backend = EagerReplayBackend(runner.pool, runner.backend.sm_scale)
    runner.model.attention = runner.backend = backend
    graphs = DecodeGraphs(runner.model, backend, max_batch, runner.pool.pages_for(TINY.max_position_embeddings),
                          torch.device("cpu"))
    for bs in graphs.sizes:
        graphs._graphs[bs] = EagerReplay(graphs, bs)  # type: ignore[assignment]  # noqa: SLF001
        graphs._hidden[bs] = torch.zeros(bs, TINY.hidden_size)  # noqa: SLF001
    runner.graphs = graphs


@pytest.mark.parametrize("fmt_kw", [{}, {"window": 4, "sinks": 2}])
def test_the_decode_graph_path_gives_the_eager_tokens(fmt_kw: dict[str, int]) -> None:
    """DecodeGraphs.run, the backend's graph buffers and padded rows, with overlapped steps feeding tokens on
    the device: the same tokens as eager synchronous decode (the reference computes padded rows too)."""
    requests = [GenerateParams(f"r{i}", prompt(i, n), max_new_tokens=10, ignore_eos=True)
                for i, n in enumerate([1, 5, 17, 9, 3])]
    eager = tiny_engine("int4-bdr", overlap=False, prefix_cache=False, hadamard_order=32, **fmt_kw)
    graphs = tiny_engine("int4-bdr", overlap=True, prefix_cache=False, hadamard_order=32, **fmt_kw)
    with_eager_replay_graphs(graphs, max_batch=8)  # before any request reaches its engine thread
    EagerReplay.replays = 0
    try:
        want = run(eager, requests)
        got = run(graphs, requests)
    finally:
        eager.shutdown()
        graphs.shutdown()
    assert EagerReplay.replays >= 9  # every decode step of the graphs engine replayed
    assert got == want


def test_a_backend_that_reads_the_host_cannot_be_captured() -> None:
    pool = KVPool(KVFormat.make("int4", 64), 1, 2, num_pages=8, page_size=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot be captured"):
        DecodeGraphs(torch.nn.Identity(), ReferenceBackend(pool, 0.125), 4, 2, torch.device("cpu"))
    assert not AttentionBackend.supports_cuda_graphs


# --- the pinned host sets ---------------------------------------------------------------------


class SimulatedStream:
    """Device work queued by the host and run only when the host waits for it: the worst case of a GPU still
    busy with earlier steps."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], None]] = []
        self.ran = 0  # ops run so far

    def enqueue(self, op: Callable[[], None]) -> int:
        self.queued.append(op)
        return len(self.queued)  # an "event": done once this many ops have run

    def run_until(self, event: int) -> int:
        """Run ops up to event; how many had to run (0: the wait did not block)."""
        before = self.ran
        while self.ran < event:
            self.queued[self.ran]()
            self.ran += 1
        return self.ran - before


class SimulatedPinnedInputs(PinnedInputs):
    """PinnedInputs whose copies and events go through a SimulatedStream. guard=False drops the wait in fill(), so
    only the rotation protects the sets."""

    def __init__(self, device_buffers: dict[str, torch.Tensor], stream: SimulatedStream, sets: int,
                 guard: bool) -> None:
        self.stream, self.guard, self.blocked = stream, guard, 0
        self._marks: dict[int, int] = {}
        super().__init__(device_buffers, sets)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.stream.enqueue(lambda: dst.copy_(src))  # reads the host buffer when it runs, as a DMA does

    def _record(self, turn: int) -> None:
        self._marks[turn] = len(self.stream.queued)

    def _wait(self, turn: int) -> None:
        if self.guard:
            self.blocked += self.stream.run_until(self._marks.get(turn, 0))


@pytest.mark.parametrize("sets,guard,correct", [
    (2, False, True),  # two sets in the engine's order: safe without waiting
    (2, True, True),  # and the event guard never blocks (checked below)
    (1, True, True),  # one set is safe only by waiting
    (1, False, False),  # one set, no wait: a step reads the next step's inputs (what the test must catch)
])
def test_a_pinned_set_is_rewritten_only_after_the_copies_that_read_it(sets: int, guard: bool,
                                                                      correct: bool) -> None:
    """The overlap loop's order (engine.py): launch step N+1 (fill, copy, replay), then wait for step N's done
    event; every replay must see its own step's inputs."""
    stream = SimulatedStream()
    device = torch.zeros(4, dtype=torch.int64)
    inputs = SimulatedPinnedInputs({"ids": device}, stream, sets, guard)
    seen: dict[int, list[int]] = {}
    done: dict[int, int] = {}
    turns = []
    for step in range(8):
        host = inputs.fill()
        turns.append(inputs.turn)
        host["ids"][:] = step
        inputs.upload({"ids": slice(0, 4)})
        stream.enqueue(lambda s=step: seen.__setitem__(s, device.tolist()))  # the replay reads the device buffer
        done[step] = stream.enqueue(lambda: None)  # the step's done event, after its sampling
        if step > 0:
            stream.run_until(done[step - 1])  # collect(step - 1)
    stream.run_until(len(stream.queued))
    assert (all(seen[s] == [s] * 4 for s in seen)) == correct, seen
    assert turns == [s % sets for s in range(8)]
    if sets == 2:
        assert inputs.blocked == 0


def test_consecutive_fills_hand_out_different_host_buffers() -> None:
    inputs = PinnedInputs({"ids": torch.zeros(3, dtype=torch.int64), "table": torch.zeros(2, 5, dtype=torch.int32)})
    a, b, c = inputs.fill(), inputs.fill(), inputs.fill()
    for name in ("ids", "table"):
        assert a[name].ctypes.data != b[name].ctypes.data
        assert a[name].ctypes.data == c[name].ctypes.data
