"""Accuracy math, kept free of I/O so it can be unit-tested against hand-computed values.

KL over top-k logprobs (what the OpenAI API returns): for one position let P be the reference (bf16)
and Q the candidate. S = P's top-k tokens plus the observed token (whose logprob both runs return
exactly). For t in S missing from Q's top-k, q_t is unknown; we set it to min(Q's k-th probability,
Q's leftover mass / number of missing tokens) -- the largest value consistent with what Q returned.
The rest of the vocabulary is merged into one bucket with mass 1 - sum_S. The result is the KL
between these coarsened distributions: with exact q_t it is a lower bound of the true KL (data
processing inequality); the q_t guess can push it either way, and it is exact when k covers the mass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

TINY = 1e-12


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood."""
    if not token_logprobs:
        raise ValueError("no tokens")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))


def kl_topk(ref_top: Mapping[str, float], ref_tok: tuple[str, float], cand_top: Mapping[str, float],
            cand_tok_lp: float) -> float:
    """Approximate KL(P || Q) at one position from top-k logprob dicts (see module doc)."""
    support = dict(ref_top)
    support[ref_tok[0]] = ref_tok[1]
    cand = dict(cand_top)
    cand[ref_tok[0]] = cand_tok_lp
    q_known = [math.exp(v) for v in cand_top.values()]
    q_floor = min(q_known) if q_known else 1.0
    q_left = max(1.0 - sum(math.exp(v) for v in cand.values()), 0.0)
    missing = [t for t in support if t not in cand]
    q_guess = min(q_floor, q_left / len(missing)) if missing else 0.0
    kl, p_sum, q_sum = 0.0, 0.0, 0.0
    for t, lp in support.items():
        p = math.exp(lp)
        q = math.exp(cand[t]) if t in cand else q_guess
        p_sum, q_sum = p_sum + p, q_sum + q
        kl += p * (lp - math.log(max(q, TINY)))
    p_rest, q_rest = max(1.0 - p_sum, 0.0), max(1.0 - q_sum, TINY)
    if p_rest > TINY:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)


def kl_full(ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> np.ndarray:
    """Exact KL(P || Q) per row from full log-softmax rows [n, vocab] (in-process runs)."""
    p = np.exp(ref_logprobs)
    return (p * (ref_logprobs - cand_logprobs)).sum(-1)


def top1(top: Mapping[str, float]) -> str | None:
    return max(top, key=top.__getitem__) if top else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
