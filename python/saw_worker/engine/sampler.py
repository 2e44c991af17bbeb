"""Next-token sampling for a batch: logit bias, penalties, grammars, greedy, temperature, top-k, top-p, min-p,
seeds.

Seeded requests draw their uniform numbers from their own CPU generator, so the same seed gives
the same tokens whatever else is in the batch; the draw itself (inverse CDF, in the sorted order when a row
filters by top-k or top-p) is batched.

Logit bias and the penalties (OpenAI's frequency and presence, vLLM's repetition) change the logits that
greedy and sampling choose from, in that order, as vLLM does, and a grammar (grammar.py) masks what it does
not allow; logprobs stay those of the model. Their state lives on the device (penalties.py), changed by one
launch per step and counted by the sampler itself, so a launched step's token never has to reach the host
first (overlapped decode). Requests without these options cost nothing extra.
"""

from __future__ import annotations

import torch

from saw_worker.engine.grammar import GrammarMasks
from saw_worker.engine.penalties import PenaltyTable, penalize_reference
from saw_worker.engine.pinned_inputs import upload
from saw_worker.engine.request import Sequence, TokenLogprob


def _filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's most likely token's."""
    top = logits.max(-1, keepdim=True).values
    return logits.masked_fill(logits < top + min_p.log()[:, None], float("-inf"))


def _draw(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from softmax(scaled) with each row's top-k (0: off) and top-p nucleus: sorted once, the
    nucleus is a prefix of the sorted row (top-p measured on the top-k's renormalized mass, as vLLM does)."""
    vocab = scaled.shape[-1]
    ranked, order = scaled.sort(-1, descending=True)
    probs = ranked.softmax(-1)
    cdf = probs.cumsum(-1)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()
    top_k_mass = cdf.gather(1, (k - 1)[:, None])
    kept = ((cdf - probs) <= top_p[:, None] * top_k_mass).sum(-1).clamp(min=1).minimum(k)  # mass before rises
    kept_mass = cdf.gather(1, (kept - 1)[:, None])
    rank = torch.searchsorted(cdf, u[:, None] * kept_mass).minimum((kept - 1)[:, None])
    return order.gather(1, rank).squeeze(1)


def _draw_unfiltered(scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = scaled.softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=scaled.shape[-1] - 1)


class Sampler:
    """Samples a step's tokens; owns the device state of the requests' penalties and the grammar bitmask."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda":
            from saw_kernels.penalties import penalize  # a GPU build of Triton
        else:
            penalize = penalize_reference
        self.penalties = PenaltyTable(device, penalize)
        self.grammars = GrammarMasks(device)

    def _adjust(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """adjust_logits, and the penalized requests' batch and table rows (to count their drawn tokens)."""
        rows = [i for i, s in enumerate(seqs) if s.params.sampling.penalizes or s.params.sampling.logit_bias]
        if not rows and all(s.matcher is None for s in seqs):
            return logits, None
        if any(s.params.return_logprobs or s.params.top_logprobs for s in seqs):
            logits = logits.clone()  # logprobs are the model's
        counted = None
        if rows:
            table_rows = self.penalties.apply(logits, [seqs[i] for i in rows], rows)
            counted = upload(rows, torch.int64, logits.device), table_rows
        self.grammars.apply(logits, seqs)
        return logits, counted

    def adjust_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits with each request's logit bias, penalties and grammar mask applied: in place, or in a copy
        when a request wants logprobs (they are the model's)."""
        return self._adjust(logits, seqs)[0]

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B] (int64, same device)."""
        params = [s.params.sampling for s in seqs]
        logits, counted = self._adjust(logits, seqs)
        greedy = logits.argmax(-1)
        if all(p.temperature == 0 for p in params):
            tokens = greedy
        else:
            # the rows' options and uniforms in one upload that does not wait for the forward
            temperature, top_k, top_p, min_p, u = upload(
                [[p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                 [p.min_p for p in params], [float(torch.rand(1, generator=s.generator)) for s in seqs]],
                torch.float32, logits.device).unbind(0)
            scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
            if any(p.min_p > 0 for p in params):
                scaled = _filter_min_p(scaled, min_p)
            if any(p.top_k > 0 or p.top_p < 1 for p in params):
                drawn = _draw(scaled, top_k, top_p, u)
            else:
                drawn = _draw_unfiltered(scaled, u)
            tokens = torch.where(temperature == 0, greedy, drawn)
        if counted is not None:
            batch_rows, table_rows = counted
            self.penalties.count(table_rows, tokens[batch_rows])
        self.grammars.defer_accept(seqs, tokens)
        return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probability of each chosen token under the model, with the `top` most likely alternatives."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(1).tolist()
    if top == 0:
        return [TokenLogprob(c) for c in chosen]
    values, ids = logp.topk(top, -1)
    return [TokenLogprob(c, list(zip(i, v, strict=True)))
            for c, i, v in zip(chosen, ids.tolist(), values.tolist(), strict=True)]
