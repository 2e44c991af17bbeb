"""The attention backend the models call: it owns each step's attention metadata and the decode graphs' static
metadata buffers, writes the step's new K/V into the paged pool and attends over it.

The interface (shaped like SGLang's attention backends):

- `prepare(h)`: an eager step's metadata (StepLayout) from the host batch: new-token slots, cu_seqlens,
  seq_lens, prefix_lens, the page table and the bf16 window's layout.
- `allocate_graph_buffers(max_batch, max_pages)`, `prepare_for_capture(batch_size)`,
  `prepare_for_replay(h, batch_size)`: the static device buffers the decode CUDA graphs read
  (engine/cuda_graphs.py), the metadata a capture records as views of them, and each replay's fill of them
  (through double-buffered pinned host memory, engine/pinned_inputs.py).
- `__call__(layer_id, q, k, v)`, what the model calls: `forward_decode` or `forward_extend` of the step.

Two implementations share this metadata code: `TritonBackend` (kv/triton_backend.py, the saw_kernels
kernels, CUDA) and `ReferenceBackend` (kv/reference_backend.py, the torch reference of kv/reference.py).
builder.attention_backend picks one. A format's K scale is not applied here: the model hands over q lambda and
k / lambda already (DecoderLayer.k_scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saw_kv.cache import LayerCache
from saw_worker.engine.pinned_inputs import PinnedInputs
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference import WindowLayout

if TYPE_CHECKING:
    from saw_worker.engine.model_runner import HostBatch


@dataclass
class StepLayout:
    """Where this step's tokens go and what each request sees (all on the pool's device)."""

    slots: torch.Tensor  # int64 [T]: cache slot of each new token (-1 = padding)
    cu_seqlens: torch.Tensor  # int32 [B+1]: new-token rows of each request
    seq_lens: torch.Tensor  # int32 [B]: tokens in cache after this step, new ones included
    prefix_lens: torch.Tensor  # int32 [B]: tokens cached before this step
    page_table: torch.Tensor  # int32 [B, max_pages]
    is_decode: bool  # every request adds exactly one token
    max_new_len: int
    max_prefix_len: int | None = None  # host copy of prefix_lens.max(), when known
    window: WindowLayout | None = None  # set when the pool keeps a bf16 window

    def window_of(self, cache: LayerCache) -> WindowLayout | None:
        """The window layout for a layer that keeps a ring (bf16 layers of a windowed format do not)."""
        return self.window if cache.ring_k is not None else None


# Per-request metadata a decode graph reads, by HostBatch field, with what padded rows hold: they write nowhere
# (slot -1), attend to one token of page 0 (seq_lens 1: one INT4 token, no ring tokens, no sinks) and send their
# token to the ring's dump row.
_GRAPH_ROWS = ("slots", "seq_lens", "prefix_lens")
_GRAPH_WINDOW_ROWS = ("window_rows", "window_lens", "quant_lens", "window_slots", "window_sinks")
_INT64 = ("slots", "window_slots")


class AttentionBackend:
    """Writes each step's new K/V into the pool and attends over it; see the module docstring."""

    supports_cuda_graphs = False  # whether forward_decode is capturable (no host reads of device values)

    def __init__(self, pool: KVPool, sm_scale: float) -> None:
        self.pool = pool
        self.sm_scale = sm_scale
        # sees each layer's new q and K (calibration)
        self.observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
        self._layout: StepLayout | None = None
        self._pin = pool.device.type == "cuda"
        self._graph_inputs: PinnedInputs | None = None
        self._graph_cu: torch.Tensor | None = None

    @property
    def layout(self) -> StepLayout | None:
        """The metadata the next forward reads: the last prepare() or prepare_for_capture()."""
        return self._layout

    # --- the model's call ------------------------------------------------------------------

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay = self._layout
        assert lay is not None, "no step prepared: call prepare() or prepare_for_capture() first"
        if self.observer is not None:
            self.observer(layer_id, q, k)
        cache = self.pool.layer(layer_id)
        if lay.is_decode:
            return self.forward_decode(q, k, v, cache, lay)
        return self.forward_extend(q, k, v, cache, lay)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        """One new token per request: store k, v [B, Hkv, D] and attend q [B, Hq, D] -> o [B, Hq, D]."""
        raise NotImplementedError

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       lay: StepLayout) -> torch.Tensor:
        """Prefill chunks: store k, v [T, Hkv, D] and attend q [T, Hq, D] causally -> o [T, Hq, D]."""
        raise NotImplementedError

    # --- eager steps -----------------------------------------------------------------------

    def prepare(self, h: HostBatch) -> None:
        """This step's metadata from the host batch, for an eager forward."""
        width = max(len(t) for t in h.tables)
        table = [x for t in h.tables for x in t + [0] * (width - len(t))]
        window = None
        if h.window_rows:
            window = WindowLayout(self._tensor(h.window_rows, torch.int32), self._tensor(h.window_lens, torch.int32),
                                  self._tensor(h.quant_lens, torch.int32), self._tensor(h.window_slots, torch.int64),
                                  self._tensor(h.window_sinks, torch.int32))
        self._layout = StepLayout(
            slots=self._tensor(h.slots, torch.int64),
            cu_seqlens=self._tensor(h.cu, torch.int32),
            seq_lens=self._tensor(h.seq_lens, torch.int32),
            prefix_lens=self._tensor(h.prefix_lens, torch.int32),
            page_table=self._tensor(table, torch.int32).view(len(h.tables), width),
            is_decode=h.is_decode,
            max_new_len=max(b - a for a, b in zip(h.cu, h.cu[1:], strict=False)),
            max_prefix_len=max(h.prefix_lens),
            window=window,
        )

    def warm_up_batch(self, rows: int, context: int) -> HostBatch:
        """A decode batch of `rows` rows at position context - 1 of page 0, all writing that slot and attending to
        page 0, its newest tokens from the dump row of the ring (where a graph's padded rows write): to compile a
        forward at startup, before any request holds page 0."""
        from saw_worker.engine.model_runner import HostBatch  # the runner imports this module

        ring = min(self.pool.window, context - 1)
        pad = {**self._graph_pad(), "slots": context - 1, "seq_lens": context, "prefix_lens": context - 1,
               "window_lens": ring, "quant_lens": context - 1 - ring}
        windows = {name: [pad[name]] * rows if self.pool.window else [] for name in _GRAPH_WINDOW_ROWS}
        return HostBatch(ids=[0] * rows, positions=[context - 1] * rows, slots=[pad["slots"]] * rows,
                         cu=list(range(rows + 1)), seq_lens=[pad["seq_lens"]] * rows,
                         prefix_lens=[pad["prefix_lens"]] * rows, tables=[[0]] * rows, is_decode=True, **windows)

    def _tensor(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.pool.device, non_blocking=True)

    # --- decode CUDA graphs ----------------------------------------------------------------

    def allocate_graph_buffers(self, max_batch: int, max_pages: int) -> None:
        """Static device buffers for decode graphs of up to max_batch requests and max_pages pages each, holding
        padded rows until a replay fills them."""
        dev, pad = self.pool.device, self._graph_pad()
        buffers = {name: torch.full((max_batch,), pad[name], dtype=torch.int64 if name in _INT64 else torch.int32,
                                    device=dev) for name in self._graph_rows()}
        buffers["page_table"] = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=dev)
        self._graph_inputs = PinnedInputs(buffers)
        self._graph_cu = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)  # one new token per request

    def prepare_for_capture(self, batch_size: int) -> None:
        """The metadata of a decode graph for batch_size requests: views of the static buffers, which
        prepare_for_replay fills before each replay."""
        assert self._graph_inputs is not None and self._graph_cu is not None, "allocate_graph_buffers() first"
        d = self._graph_inputs.device_buffers
        window = None
        if self.pool.window:
            window = WindowLayout(*(d[name][:batch_size] for name in _GRAPH_WINDOW_ROWS))
        self._layout = StepLayout(slots=d["slots"][:batch_size], cu_seqlens=self._graph_cu[:batch_size + 1],
                                  seq_lens=d["seq_lens"][:batch_size], prefix_lens=d["prefix_lens"][:batch_size],
                                  page_table=d["page_table"][:batch_size], is_decode=True, max_new_len=1,
                                  window=window)

    def prepare_for_replay(self, h: HostBatch, batch_size: int) -> None:
        """Fill the static buffers of the batch_size graph with h's decode rows (the rest padded), through this
        step's set of pinned host buffers; the copies are queued on the current stream, before the replay."""
        assert self._graph_inputs is not None, "allocate_graph_buffers() first"
        n, pad = len(h.seq_lens), self._graph_pad()
        host = self._graph_inputs.fill()
        rows = self._graph_rows()
        for name in rows:
            host[name][:n] = getattr(h, name)
            host[name][n:batch_size] = pad[name]
        table = host["page_table"]
        for i, pages in enumerate(h.tables):
            table[i, : len(pages)] = pages
        table[n:batch_size, 0] = 0
        width = max(len(p) for p in h.tables)
        extents: dict[str, slice | tuple[slice, ...]] = {name: slice(0, batch_size) for name in rows}
        extents["page_table"] = (slice(0, batch_size), slice(0, width))
        self._graph_inputs.upload(extents)

    def _graph_rows(self) -> tuple[str, ...]:
        return _GRAPH_ROWS + (_GRAPH_WINDOW_ROWS if self.pool.window else ())

    def _graph_pad(self) -> dict[str, int]:
        pool = self.pool
        return {"slots": -1, "seq_lens": 1, "prefix_lens": 0, "window_rows": pool.dump_row, "window_lens": 0,
                "quant_lens": 1, "window_slots": pool.dump_slot, "window_sinks": 0}
