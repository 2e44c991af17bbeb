"""CUDA graphs of the decode forward pass, one per padded batch size.

Decode launches hundreds of small kernels per step; replaying a captured graph removes the CPU
launch cost. Inputs live in static device buffers, filled from pinned host buffers each step (two
sets in turn, engine/pinned_inputs.py): the token ids and positions here, the attention metadata in
the attention backend (kv/backend.py: prepare_for_capture, prepare_for_replay). Padded rows write
nowhere (slot -1) and attend to one token of page 0, and their outputs are dropped. The attention
kernels choose their grid from shapes only, so one capture per batch size serves any mix of lengths
up to the captured page-table width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from saw_worker.engine.pinned_inputs import PinnedInputs
from saw_worker.kv.backend import AttentionBackend

if TYPE_CHECKING:
    from saw_worker.engine.model_runner import HostBatch


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return [s for s in sizes if s <= max_batch] or [1]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, max_batch: int, max_pages: int,
                 device: torch.device) -> None:
        if not backend.supports_cuda_graphs:
            raise ValueError(f"{type(backend).__name__} cannot be captured in a CUDA graph")
        self.model = model
        self.backend = backend
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_pages = max_pages
        n = self.max_batch
        self._ids = torch.zeros(n, dtype=torch.int64, device=device)
        self._positions = torch.zeros(n, dtype=torch.int64, device=device)
        self._inputs = PinnedInputs({"ids": self._ids, "positions": self._positions})
        backend.allocate_graph_buffers(n, max_pages)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        ids, pos = self._ids, self._positions
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.backend.prepare_for_capture(bs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model(ids[:bs], pos[:bs])  # warm-up: compiles kernels outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._hidden[bs] = self.model(ids[:bs], pos[:bs])
            self._graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, batch_size: int, pages: int) -> bool:
        return batch_size <= self.max_batch and pages <= self.max_pages

    def run(self, h: HostBatch, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the graph for the decode rows of h; returns their hidden states. device_ids, when
        given, replace h.ids (tokens sampled by the previous step, still on the device)."""
        n = len(h.ids)
        bs = next(s for s in self.sizes if s >= n)
        host = self._inputs.fill()
        for name, values in (("ids", h.ids), ("positions", h.positions)):
            host[name][:n] = values
            host[name][n:bs] = 0
        self._inputs.upload({"ids": slice(0, bs), "positions": slice(0, bs)})
        self.backend.prepare_for_replay(h, bs)
        if device_ids is not None:
            self._ids[:n].copy_(device_ids)
        self._graphs[bs].replay()
        return self._hidden[bs][:n]
