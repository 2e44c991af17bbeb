"""Next-token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds.

Seeded requests draw their uniform numbers from their own CPU generator, so the same seed gives
the same tokens whatever else is in the batch; the draw itself (inverse CDF) is batched.
"""

from __future__ import annotations

import torch

from saw_worker.engine.request import Sequence, TokenLogprob


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf (sorted, descending)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = rank[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop |= mass_before > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] (int64, same device)."""
    params = [s.params.sampling for s in seqs]
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    dev = logits.device
    temp = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    probs = _filter_top_k_top_p(logits / temp[:, None], top_k, top_p).softmax(-1)
    u = torch.cat([torch.rand(1, generator=s.generator) for s in seqs]).to(dev)
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=logits.shape[-1] - 1)
    is_greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
    return torch.where(is_greedy, greedy, drawn)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probability of each chosen token under the model, with the `top` most likely alternatives."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(1).tolist()
    if top == 0:
        return [TokenLogprob(c) for c in chosen]
    values, ids = logp.topk(top, -1)
    return [TokenLogprob(c, list(zip(i, v, strict=True)))
            for c, i, v in zip(chosen, ids.tolist(), values.tolist(), strict=True)]
