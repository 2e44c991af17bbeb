"""Turns a scheduled Batch into tensors, runs the model, and samples."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from saw_worker.engine.cuda_graphs import DecodeGraphs
from saw_worker.engine.pinned_inputs import download, upload
from saw_worker.engine.request import GenerateParams, Sequence, TokenLogprob
from saw_worker.engine.sampler import Sampler, token_logprobs
from saw_worker.engine.scheduler import Batch, Chunk
from saw_worker.kv.backend import AttentionBackend
from saw_worker.kv.pool import KVPool
from saw_worker.models.compiled import CompiledDecode


@dataclass
class ChunkResult:
    token: int | None = None  # sampled next token, when the chunk reached the sequence's end
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class LaunchedStep:
    """A decode step whose forward and sampling are queued on the device but not waited for."""

    batch: Batch
    tokens: torch.Tensor  # device [rows]: sampled tokens, the next step's inputs
    host_tokens: torch.Tensor  # the same, copied to (pinned) host memory when `done`
    done: torch.cuda.Event | None  # None on CPU, where the step already ran


@dataclass
class HostBatch:
    """A batch's inputs as host lists, before they become device tensors."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    cu: list[int]  # new-token rows of request b: cu[b]:cu[b+1]
    seq_lens: list[int]
    prefix_lens: list[int]
    tables: list[list[int]]
    is_decode: bool = False  # one new token per request (Batch.is_decode)
    # the bf16 window (WindowLayout), empty without one
    window_rows: list[int] = field(default_factory=list)
    window_lens: list[int] = field(default_factory=list)
    quant_lens: list[int] = field(default_factory=list)
    window_slots: list[int] = field(default_factory=list)
    window_sinks: list[int] = field(default_factory=list)


def host_batch(batch: Batch, pool: KVPool) -> HostBatch:
    page, w, sinks, n_slots = pool.page_size, pool.window, pool.sinks, pool.fmt.ring_slots
    h = HostBatch([], [], [], [0], [], [], [], batch.is_decode)
    for c in batch.chunks:
        seq, pages = c.seq, c.seq.pages
        known = seq.token_ids[c.start:c.end]
        h.ids += known + [0] * (c.end - c.start - len(known))  # a launched token: launch() reads it on the device
        h.positions += range(c.start, c.end)
        h.slots += [pages[p // page] * page + p % page for p in range(c.start, c.end)]
        h.cu.append(h.cu[-1] + c.end - c.start)
        h.seq_lens.append(c.end)
        h.prefix_lens.append(c.start)
        h.tables.append(pages)
        if w:
            held = seq.window_row is not None
            row = seq.window_row if held else pool.dump_row
            first_s = sinks if seq.ring_holds_sinks else 0
            held_sinks = min(first_s, c.start)
            ring = min(w, c.start - max(seq.window_start, held_sinks)) if held else 0
            h.window_rows.append(row)
            h.window_lens.append(ring)
            h.quant_lens.append(c.start - ring)
            h.window_sinks.append(held_sinks)
            # a token stays in the ring as a sink, or in the window if it is among the newest W after the step
            h.window_slots += [row * n_slots + p if p < first_s else
                               (row * n_slots if p >= c.end - w else pool.dump_slot) + sinks + p % w
                               for p in range(c.start, c.end)]
    return h


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.backend = backend  # the model's attention: it prepares each step's metadata
        self.pool = pool
        self.device = device
        self.sampler = Sampler(device)
        self.graphs: DecodeGraphs | None = None
        self.compiled: CompiledDecode | None = None
        # Where every weight a decode step reads goes through the native kernels' thread pool, torch runs those
        # steps on one thread: its idle OpenMP workers would spin against the pool's on the same cores.
        self.decode_torch_threads = 1 if getattr(model, "native_decode", False) else None

    @contextmanager
    def _threads(self, batch: Batch) -> Iterator[None]:
        """torch's thread count for the batch's step (decode_torch_threads), restored after."""
        keep = torch.get_num_threads()
        if not batch.is_decode or self.decode_torch_threads is None or self.decode_torch_threads == keep:
            yield
            return
        torch.set_num_threads(self.decode_torch_threads)
        try:
            yield
        finally:
            torch.set_num_threads(keep)

    def capture_graphs(self, max_batch: int, max_context: int) -> None:
        """Capture decode graphs (CUDA only) for batches up to max_batch and contexts up to max_context."""
        self.graphs = DecodeGraphs(self.model, self.backend, max_batch, self.pool.pages_for(max_context),
                                   self.device)
        self.graphs.capture()

    @torch.inference_mode()
    def compile_decode(self) -> None:
        """Compile the decode forward (CPU; models/compiled.py) and run it once at each compiled shape; where
        that fails, decode stays eager."""
        self.compiled = CompiledDecode.build(self.model, self.backend, self._warm_up)

    def _warm_up(self, compiled: CompiledDecode) -> None:
        """Compile the step's graphs by running decode steps on page 0 (AttentionBackend.warm_up_batch) at 2 rows
        (any number above 1) and 1 row (dynamo specialises size 1)."""
        context = min(self.pool.page_size, 5)
        for rows in (2, 1):
            self._eager(self.backend.warm_up_batch(rows, context), forward=compiled)

    def _tensor(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        return upload(data, dtype, self.device)

    def _eager(self, h: HostBatch, ids: torch.Tensor | None = None,
               forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        self.backend.prepare(h)
        ids = self._tensor(h.ids, torch.int64) if ids is None else ids
        return (forward or self.model)(ids, self._tensor(h.positions, torch.int64))

    def _forward(self, batch: Batch, h: HostBatch, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of the batch's rows; ids (device) replace h.ids when given."""
        graphs, compiled = self.graphs, self.compiled
        if batch.is_decode and graphs is not None and graphs.fits(len(h.ids), max(len(t) for t in h.tables)):
            return graphs.run(h, ids)
        if batch.is_decode and compiled is not None and compiled.fits(len(h.ids)):
            return self._eager(h, ids, compiled)
        return self._eager(h, ids)

    @torch.inference_mode()
    def launch(self, batch: Batch, previous: LaunchedStep | None) -> LaunchedStep:
        """Queue a decode step without waiting for it. A request whose input token is not on the host yet (it has a
        launched_row: the previous step sampled it) takes it from previous.tokens on the device."""
        with self._threads(batch):
            return self._launch(batch, previous)

    def _launch(self, batch: Batch, previous: LaunchedStep | None) -> LaunchedStep:
        h = host_batch(batch, self.pool)
        ids = None
        rows = [c.seq.launched_row for c in batch.chunks]
        if any(r is not None for r in rows):
            assert previous is not None, "a launched token without its launched step"
            src = self._tensor([-1 if r is None else r for r in rows], torch.int64)
            ids = torch.where(src >= 0, previous.tokens[src.clamp(min=0)], self._tensor(h.ids, torch.int64))
        hidden = self._forward(batch, h, ids)
        seqs = [c.seq for c in batch.chunks]
        tokens = self.sampler(self.model.compute_logits(hidden), seqs)
        host, done = download(tokens)
        return LaunchedStep(batch, tokens, host, done)

    @staticmethod
    def collect(step: LaunchedStep) -> list[int]:
        """Wait for a launched step; its sampled tokens, one per row."""
        if step.done is not None:
            step.done.synchronize()
        return step.host_tokens.tolist()

    @staticmethod
    def can_launch(batch: Batch) -> bool:
        """Decode steps whose requests want nothing but tokens can run ahead of the host (a grammar needs each
        token on the host before the next step's mask)."""
        return batch.is_decode and not any(
            c.seq.params.return_logprobs or c.seq.params.top_logprobs or c.seq.matcher is not None
            for c in batch.chunks)

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[ChunkResult]:
        with self._threads(batch):
            return self._run(batch)

    def _run(self, batch: Batch) -> list[ChunkResult]:
        h = host_batch(batch, self.pool)
        hidden = self._forward(batch, h)

        results = [ChunkResult() for _ in batch.chunks]
        offsets = h.cu
        sampling = [i for i, c in enumerate(batch.chunks) if c.samples]
        if sampling:
            rows = self._tensor([offsets[i + 1] - 1 for i in sampling], torch.int64)
            logits = self.model.compute_logits(hidden[rows])
            seqs = [batch.chunks[i].seq for i in sampling]
            tokens = self.sampler(logits, seqs)
            top = max(s.params.top_logprobs for s in seqs)
            wants = any(s.params.return_logprobs or s.params.top_logprobs for s in seqs)
            lps = token_logprobs(logits, tokens, top) if wants else None
            for j, (i, t) in enumerate(zip(sampling, tokens.tolist(), strict=True)):
                results[i].token = t
                if lps is not None and (seqs[j].params.return_logprobs or seqs[j].params.top_logprobs):
                    lps[j].top = lps[j].top[: seqs[j].params.top_logprobs]
                    results[i].logprob = lps[j]
        for i, c in enumerate(batch.chunks):
            if c.seq.wants_prompt_logprobs:
                results[i].prompt_logprobs = self._prompt_logprobs(c, hidden[offsets[i]:offsets[i + 1]])
        return results

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [n, vocab] at every position of one text, run as one prefill through the real cache
        path (calibration, accuracy checks). Not for use while the engine loop runs."""
        pages = self.pool.allocate(self.pool.pages_for(len(token_ids)))
        if pages is None:
            raise RuntimeError(f"the KV pool cannot hold a {len(token_ids)}-token text")
        seq = Sequence(GenerateParams("score", token_ids, max_new_tokens=1), sink=lambda ev: None, order=0)
        seq.pages = pages
        try:
            batch = Batch([Chunk(seq, 0, len(token_ids))], is_decode=False)
            return self.model.compute_logits(self._eager(host_batch(batch, self.pool)))
        finally:
            self.pool.release(pages)

    def _prompt_logprobs(self, chunk: Chunk, hidden: torch.Tensor) -> list[TokenLogprob]:
        """Logprob of each prompt token this chunk predicts (row at position p predicts token p + 1)."""
        seq = chunk.seq
        stop = min(chunk.end, seq.num_prompt - 1)
        out = [TokenLogprob(0.0)] if chunk.start == 0 else []  # the first token has no context
        if stop <= chunk.start:
            return out
        targets = torch.tensor(seq.token_ids[chunk.start + 1:stop + 1], device=hidden.device)
        logits = self.model.compute_logits(hidden[: stop - chunk.start])
        return out + token_logprobs(logits, targets, seq.params.top_logprobs)
