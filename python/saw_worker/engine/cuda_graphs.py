"""CUDA graphs of the decode forward pass, one per padded batch size.

Decode launches hundreds of small kernels per step; replaying a captured graph removes the CPU
launch cost. Inputs live in static device buffers, filled from pinned host buffers each step;
padded rows write nowhere (slot -1) and attend to one token of page 0, and their outputs are
dropped. The attention kernels choose their grid from shapes only, so one capture per batch size
serves any mix of lengths up to the captured page-table width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from saw_worker.kv.backend import PagedAttention, StepLayout
from saw_worker.kv.reference import WindowLayout

if TYPE_CHECKING:
    from saw_worker.engine.model_runner import HostBatch


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return [s for s in sizes if s <= max_batch] or [1]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, attention: PagedAttention, max_batch: int, max_pages: int,
                 device: torch.device) -> None:
        self.model = model
        self.attention = attention
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_pages = max_pages
        n = self.max_batch

        def buffers(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
            host = torch.zeros(*shape, dtype=dtype, pin_memory=True)
            return host, host.numpy(), torch.zeros(*shape, dtype=dtype, device=device)

        self._ids = buffers(n, dtype=torch.int64)
        self._positions = buffers(n, dtype=torch.int64)
        self._slots = buffers(n, dtype=torch.int64)
        self._seq_lens = buffers(n, dtype=torch.int32)
        self._table = buffers(n, max_pages, dtype=torch.int32)
        self._window = attention.pool.window > 0
        if self._window:
            self._window_rows = buffers(n, dtype=torch.int32)
            self._window_lens = buffers(n, dtype=torch.int32)
            self._quant_lens = buffers(n, dtype=torch.int32)
            self._window_slots = buffers(n, dtype=torch.int64)
            self._window_sinks = buffers(n, dtype=torch.int32)
        self._cu = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}

    def _window_buffers(self) -> list[tuple[torch.Tensor, np.ndarray, torch.Tensor]]:
        return ([self._window_rows, self._window_lens, self._quant_lens, self._window_slots, self._window_sinks]
                if self._window else [])

    def _layout(self, bs: int) -> StepLayout:
        seq_lens = self._seq_lens[2][:bs]
        window = WindowLayout(*(buf[2][:bs] for buf in self._window_buffers())) if self._window else None
        return StepLayout(slots=self._slots[2][:bs], cu_seqlens=self._cu[: bs + 1], seq_lens=seq_lens,
                          prefix_lens=seq_lens - 1, page_table=self._table[2][:bs], is_decode=True, max_new_len=1,
                          window=window)

    @torch.inference_mode()
    def capture(self) -> None:
        ids, pos = self._ids[2], self._positions[2]
        self._seq_lens[2].fill_(1)
        self._slots[2].fill_(-1)
        if self._window:
            self._window_rows[2].fill_(self.attention.pool.dump_row)
            self._window_slots[2].fill_(self.attention.pool.dump_slot)
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            self.attention.layout = self._layout(bs)
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
        pool = self.attention.pool
        inputs = [(self._ids, h.ids, 0), (self._positions, h.positions, 0), (self._slots, h.slots, -1),
                  (self._seq_lens, h.seq_lens, 1)]
        if self._window:  # padded rows: no ring tokens, one INT4 token of page 0, their token to the dump row
            inputs += [(self._window_rows, h.window_rows, pool.dump_row), (self._window_lens, h.window_lens, 0),
                       (self._quant_lens, h.quant_lens, 1),
                       (self._window_slots, h.window_slots, pool.dump_slot),
                       (self._window_sinks, h.window_sinks, 0)]
        for buf, values, pad in inputs:
            buf[1][:n] = values
            buf[1][n:bs] = pad
        table = self._table[1]
        for i, pages in enumerate(h.tables):
            table[i, : len(pages)] = pages
        table[n:bs, 0] = 0
        for host, _, dev in (buf for buf, _, _ in inputs):
            dev[:bs].copy_(host[:bs], non_blocking=True)
        width = max(len(p) for p in h.tables)
        self._table[2][:bs, :width].copy_(self._table[0][:bs, :width], non_blocking=True)
        if device_ids is not None:
            self._ids[2][:n].copy_(device_ids)
        self._graphs[bs].replay()
        return self._hidden[bs][:n]
