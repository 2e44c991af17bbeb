"""The device state of the requests that use a logit bias or penalties: one table row each.

A row holds what its request's options need across steps: how often each token was generated (int32, counted
by the sampler itself on the device, so an overlapped step's token never has to reach the host), which tokens
the prompt holds (for the repetition penalty), the dense logit bias, and the options (frequency, presence,
repetition, has_bias). A request gets a row at its first sample and keeps it through preemption (a recompute's
outputs are already counted); the row is taken again once its request has finished or is gone. The table grows
by doubling, so a step touches the penalized rows in one launch whatever their number.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from saw_worker.engine.pinned_inputs import upload
from saw_worker.engine.request import Sequence

Penalize = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor], None]


def penalize_reference(logits: torch.Tensor, batch_rows: torch.Tensor, table_rows: torch.Tensor,
                       counts: torch.Tensor, in_prompt: torch.Tensor, bias: torch.Tensor, params: torch.Tensor,
                       ) -> None:
    """saw_kernels.penalties.penalize in torch (the CPU path and the kernel's reference): bias, then vLLM's
    repetition penalty on seen tokens, then OpenAI's frequency and presence penalties; in place."""
    rows, table_rows = batch_rows.long(), table_rows.long()
    frequency, presence, repetition, has_bias = params[table_rows].to(logits.dtype).unbind(-1)
    c = counts[table_rows].to(logits.dtype)
    x = logits[rows] + torch.where(has_bias[:, None] != 0, bias[table_rows].to(logits.dtype), 0)
    seen = (c > 0) | (in_prompt[table_rows] != 0)
    rep = repetition[:, None]
    x = torch.where(seen & (rep != 1), torch.where(x > 0, x / rep, x * rep), x)
    logits[rows] = x - frequency[:, None] * c - presence[:, None] * (c > 0)


class PenaltyTable:
    def __init__(self, device: torch.device, penalize: Penalize) -> None:
        self.device = device
        self._penalize = penalize
        self._owners: list[weakref.ref[Sequence] | None] = []
        self.counts = self.in_prompt = self.bias = self.params = torch.empty(0)

    def _grow(self, vocab: int) -> None:
        old = len(self._owners)
        rows = max(8, 2 * old)
        dev = self.device

        def grown(t: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
            new = torch.zeros(rows, width, dtype=dtype, device=dev)
            if old:
                new[:old] = t
            return new

        self.counts = grown(self.counts, torch.int32, vocab)
        self.in_prompt = grown(self.in_prompt, torch.uint8, vocab)
        self.bias = grown(self.bias, torch.float32, vocab)
        self.params = grown(self.params, torch.float32, 4)
        self._owners += [None] * (rows - old)

    def _free_row(self, vocab: int) -> int:
        for row, ref in enumerate(self._owners):
            owner = None if ref is None else ref()
            if owner is None or owner.finished:
                return row
        row = len(self._owners)
        self._grow(vocab)
        return row

    def _take_row(self, seq: Sequence, vocab: int) -> int:
        assert not self._owners or self.counts.shape[-1] == vocab, "one vocabulary per table"
        row = self._free_row(vocab)
        self._owners[row] = weakref.ref(seq)
        opts, dev = seq.params.sampling, self.device
        self.counts[row] = 0
        self.in_prompt[row] = 0
        self.in_prompt[row, upload(seq.token_ids[:seq.num_prompt], torch.int64, dev)] = 1
        self.bias[row] = 0
        if opts.logit_bias:
            token, value = zip(*opts.logit_bias, strict=True)
            self.bias[row, upload(list(token), torch.int64, dev)] = upload(list(value), torch.float32, dev)
        self.params[row] = upload([opts.frequency_penalty, opts.presence_penalty, opts.repetition_penalty,
                                   float(bool(opts.logit_bias))], torch.float32, dev)
        return row

    def apply(self, logits: torch.Tensor, seqs: list[Sequence], batch_rows: list[int]) -> torch.Tensor:
        """Bias and penalize logits' rows batch_rows (of seqs, in order) in place; their table rows (device)."""
        vocab = logits.shape[-1]
        for s in seqs:
            if s.penalty_row is None:
                s.penalty_row = self._take_row(s, vocab)
        rows = upload([batch_rows, [s.penalty_row for s in seqs]], torch.int32, self.device)
        self._penalize(logits, rows[0], rows[1], self.counts, self.in_prompt, self.bias, self.params)
        return rows[1]

    def count(self, table_rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add each drawn token (device [n], in table_rows' order) to its row's output counts."""
        self.counts.index_put_((table_rows.long(), tokens.long()), torch.ones_like(tokens, dtype=torch.int32),
                               accumulate=True)
