"""Next-token sampling for a batch: logit bias, penalties, grammars, greedy, temperature, top-k, top-p, min-p,
seeds.

Seeded requests draw their uniform numbers from their own CPU generator, so the same seed gives
the same tokens whatever else is in the batch; the draw itself (inverse CDF) is batched.

Logit bias and the penalties (OpenAI's frequency and presence, vLLM's repetition) change the logits that
greedy and sampling choose from, in that order, as vLLM does, and a grammar (grammar.py) masks what it does
not allow; logprobs stay those of the model. The penalties' token counts live on the device (PenaltyState)
and the sampler adds each drawn token to them, so a launched step's token never has to reach the host first
(overlapped decode). Requests without these options cost nothing extra.
"""

from __future__ import annotations

import torch

from saw_worker.engine.grammar import accept_tokens, mask_logits
from saw_worker.engine.request import PenaltyState, Sequence, TokenLogprob


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


def _filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's most likely token's."""
    top = logits.max(-1, keepdim=True).values
    return logits.masked_fill(logits < top + min_p.log()[:, None], float("-inf"))


def _penalty_states(seqs: list[Sequence], vocab: int, device: torch.device) -> list[PenaltyState]:
    """Each request's state, made at its first sample from its prompt (and the outputs a recompute after
    preemption already holds are in it from their samples)."""
    for seq in seqs:
        if seq.penalty_state is None:
            in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            in_prompt[torch.tensor(seq.token_ids[:seq.num_prompt], dtype=torch.int64).to(device)] = True
            seq.penalty_state = PenaltyState(torch.zeros(vocab, dtype=torch.int32, device=device), in_prompt)
    return [seq.penalty_state for seq in seqs]  # type: ignore[misc]


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor:
    """Penalizes rows (ordered as seqs) of logits in place; returns their output counts, stacked [rows, V]."""
    dev = logits.device
    states = _penalty_states(seqs, logits.shape[-1], dev)
    params = [s.params.sampling for s in seqs]
    counts = torch.stack([st.output_counts for st in states])
    x = logits[rows]
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    seen = (counts > 0) | torch.stack([st.in_prompt for st in states])
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    logits[rows] = x - freq * counts - presence * (counts > 0)
    return counts


def _count_drawn(seqs: list[Sequence], counts: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add each penalized request's drawn token to its output counts (counts: theirs, stacked), on the device."""
    counts.scatter_add_(1, tokens[:, None].to(torch.int64), torch.ones_like(counts[:, :1]))
    torch._foreach_copy_([s.penalty_state.output_counts for s in seqs], list(counts.unbind(0)))  # type: ignore


def _adjust(logits: torch.Tensor, seqs: list[Sequence]
            ) -> tuple[torch.Tensor, tuple[list[Sequence], torch.Tensor, torch.Tensor] | None]:
    """adjust_logits, and for the penalized requests (seqs, rows, stacked counts) to count the drawn tokens."""
    dev = logits.device
    biased = [bool(s.params.sampling.logit_bias) for s in seqs]
    penalized = [s.params.sampling.penalizes for s in seqs]
    if not any(biased) and not any(penalized) and all(s.matcher is None for s in seqs):
        return logits, None
    logits = logits.clone()
    if any(biased):
        pairs = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.sampling.logit_bias]
        row, token, bias = zip(*pairs, strict=True)
        index = torch.tensor([row, token], dtype=torch.int64).to(dev, non_blocking=True)
        logits.index_put_((index[0], index[1]), torch.tensor(bias, dtype=logits.dtype).to(dev), accumulate=True)
    counted = None
    if any(penalized):
        rows = torch.tensor([i for i, w in enumerate(penalized) if w], dtype=torch.int64).to(dev, non_blocking=True)
        pen_seqs = [s for s, w in zip(seqs, penalized, strict=True) if w]
        counted = pen_seqs, rows, _apply_penalties(logits, pen_seqs, rows)
    mask_logits(logits, seqs)
    return logits, counted


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits with each request's logit bias, penalties and grammar mask applied (a copy; logits is kept)."""
    return _adjust(logits, seqs)[0]


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] (int64, same device)."""
    params = [s.params.sampling for s in seqs]
    logits, counted = _adjust(logits, seqs)
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        tokens = greedy
    else:
        dev = logits.device
        temp = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
        top_k = torch.tensor([p.top_k for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        scaled = logits / temp[:, None]
        if any(p.min_p > 0 for p in params):
            scaled = _filter_min_p(scaled, torch.tensor([p.min_p for p in params], device=dev))
        probs = _filter_top_k_top_p(scaled, top_k, top_p).softmax(-1)
        u = torch.cat([torch.rand(1, generator=s.generator) for s in seqs]).to(dev)
        cdf = probs.cumsum(-1)
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=logits.shape[-1] - 1)
        is_greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
        tokens = torch.where(is_greedy, greedy, drawn)
    if counted is not None:
        pen_seqs, rows, counts = counted
        _count_drawn(pen_seqs, counts, tokens[rows])
    accept_tokens(seqs, tokens)
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
