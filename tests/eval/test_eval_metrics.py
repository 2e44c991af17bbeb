"""Perplexity, KL (exact and top-k) and pass@k against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saw_eval.metrics import kl_full, kl_topk, pass_at_k, perplexity, top1
from saw_eval.ppl import summarize

ln = math.log


def test_perplexity() -> None:
    assert perplexity([-1.0, -2.0, -3.0]) == pytest.approx(math.exp(2.0))
    assert perplexity([ln(0.25)] * 4) == pytest.approx(4.0)


def test_kl_full_matches_hand_value() -> None:
    p = np.log(np.array([[0.5, 0.3, 0.2]]))
    q = np.log(np.array([[0.4, 0.4, 0.2]]))
    # 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.4) = 0.111572 - 0.086305
    assert kl_full(p, q)[0] == pytest.approx(0.0252668, abs=1e-6)
    assert kl_full(p, p)[0] == pytest.approx(0.0)


def test_kl_topk_exact_when_k_covers_everything() -> None:
    p = {"a": ln(0.5), "b": ln(0.3), "c": ln(0.2)}
    q = {"a": ln(0.4), "b": ln(0.4), "c": ln(0.2)}
    assert kl_topk(p, ("c", ln(0.2)), q, ln(0.2)) == pytest.approx(0.0252668, abs=1e-6)


def test_kl_topk_remainder_bucket() -> None:
    # top-1 only: {a, rest} with P = (0.5, 0.5), Q = (0.4, 0.6)
    got = kl_topk({"a": ln(0.5)}, ("a", ln(0.5)), {"a": ln(0.4)}, ln(0.4))
    assert got == pytest.approx(0.5 * ln(0.5 / 0.4) + 0.5 * ln(0.5 / 0.6), abs=1e-9)


def test_kl_topk_missing_token_takes_largest_consistent_mass() -> None:
    # b is in P's top-k but not Q's: q_b = min(Q's smallest top prob 0.3, leftover 1 - 0.8) = 0.2;
    # buckets: a (0.5 | 0.3), b (0.2 | 0.2), rest (0.3 | 0.5)
    got = kl_topk({"a": ln(0.5), "b": ln(0.2)}, ("a", ln(0.5)), {"c": ln(0.5), "a": ln(0.3)}, ln(0.3))
    assert got == pytest.approx(0.5 * ln(0.5 / 0.3) + 0.3 * ln(0.3 / 0.5), abs=1e-9)


def test_top1() -> None:
    assert top1({"x": -2.0, "y": -0.1}) == "y"
    assert top1({}) is None


@pytest.mark.parametrize(("n", "c", "k", "want"), [
    (10, 3, 1, 0.3), (10, 3, 2, 1 - 21 / 45), (10, 0, 1, 0.0), (5, 4, 2, 1.0), (1, 1, 1, 1.0), (1, 0, 1, 0.0)])
def test_pass_at_k(n: int, c: int, k: int, want: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(want)


def _window(lps: list[float], tops: list[dict[str, float]]) -> dict[str, object]:
    return {"tokens": ["t0", *["a"] * (len(lps) - 1)], "token_logprobs": [None, *lps[1:]],
            "top_logprobs": [None, *tops[1:]]}


def test_summarize_against_itself_and_a_shifted_run() -> None:
    ref = [_window([0, ln(0.5), ln(0.5)], [{}, {"a": ln(0.5)}, {"a": ln(0.5)}])]
    same = summarize(ref, ref)
    assert same["ppl"] == pytest.approx(2.0)
    assert same["mean_kl_topk"] == 0 and same["top1_agree"] == 1.0
    worse = [_window([0, ln(0.4), ln(0.4)], [{}, {"a": ln(0.4)}, {"b": ln(0.45), "a": ln(0.4)}])]
    s = summarize(worse, ref)
    assert s["ppl"] == pytest.approx(2.5)
    assert s["top1_agree"] == 0.5
    assert s["mean_kl_topk"] > 0
