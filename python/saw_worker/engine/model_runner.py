"""Turns a scheduled Batch into tensors, runs the model, and samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from saw_worker.engine.request import TokenLogprob
from saw_worker.engine.sampler import sample, token_logprobs
from saw_worker.engine.scheduler import Batch, Chunk
from saw_worker.kv.backend import PagedAttention, StepLayout
from saw_worker.kv.pool import KVPool


@dataclass
class ChunkResult:
    token: int | None = None  # sampled next token, when the chunk reached the sequence's end
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, attention: PagedAttention, pool: KVPool, device: torch.device) -> None:
        self.model = model
        self.attention = attention
        self.pool = pool
        self.device = device
        self._pin = device.type == "cuda"

    def _tensor(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)

    def _layout(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, StepLayout]:
        page = self.pool.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        for c in batch.chunks:
            pages = c.seq.pages
            ids += c.seq.token_ids[c.start:c.end]
            positions += range(c.start, c.end)
            slots += [pages[p // page] * page + p % page for p in range(c.start, c.end)]
            cu.append(cu[-1] + c.end - c.start)
        width = max(len(c.seq.pages) for c in batch.chunks)
        table = [c.seq.pages + [0] * (width - len(c.seq.pages)) for c in batch.chunks]
        layout = StepLayout(
            slots=self._tensor(slots, torch.int64),
            cu_seqlens=self._tensor(cu, torch.int32),
            seq_lens=self._tensor([c.end for c in batch.chunks], torch.int32),
            prefix_lens=self._tensor([c.start for c in batch.chunks], torch.int32),
            page_table=self._tensor(sum(table, []), torch.int32).view(len(table), width),
            is_decode=batch.is_decode,
            max_new_len=max(c.end - c.start for c in batch.chunks),
        )
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), layout

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[ChunkResult]:
        input_ids, positions, layout = self._layout(batch)
        self.attention.layout = layout
        hidden = self.model(input_ids, positions)

        results = [ChunkResult() for _ in batch.chunks]
        offsets = layout.cu_seqlens.tolist()
        sampling = [i for i, c in enumerate(batch.chunks) if c.samples]
        if sampling:
            rows = torch.tensor([offsets[i + 1] - 1 for i in sampling], device=hidden.device)
            logits = self.model.compute_logits(hidden[rows])
            seqs = [batch.chunks[i].seq for i in sampling]
            tokens = sample(logits, seqs)
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
