"""The sampler's logit bias, penalties and min-p against direct computations, and through the engine."""

from __future__ import annotations

import pytest
import torch
from engine_util import Collector, prompt, run, tiny_engine

from saw_worker.engine.request import GenerateParams, RequestError, SamplingOptions, Sequence
from saw_worker.engine.sampler import Sampler, _draw

VOCAB = 11
CPU = torch.device("cpu")


def seq(prompt_ids: list[int], return_logprobs: bool = False, **options: object) -> Sequence:
    return Sequence(GenerateParams("r", prompt_ids, max_new_tokens=8, return_logprobs=return_logprobs,
                                   sampling=SamplingOptions(**options)), sink=lambda ev: None, order=0)


def test_requests_without_options_keep_their_logits() -> None:
    logits = torch.randn(2, VOCAB)
    assert Sampler(CPU).adjust_logits(logits, [seq([1]), seq([2])]) is logits


def test_logit_bias_adds_to_its_row_only() -> None:
    logits = torch.randn(2, VOCAB)
    want = logits.clone()
    want[1, 3] -= 100
    want[1, 5] += 2.5
    def biased() -> Sequence:
        return seq([1], logit_bias=((3, -100.0), (5, 2.5)))

    kept = logits.clone()  # a request that wants logprobs keeps the model's logits: the sampler works on a copy
    got = Sampler(CPU).adjust_logits(kept, [seq([1], return_logprobs=True), biased()])
    assert torch.equal(got, want) and torch.equal(kept, logits)
    assert torch.equal(Sampler(CPU).adjust_logits(logits, [seq([1]), biased()]), want)


def test_penalties_follow_the_openai_and_vllm_formulas_and_count_what_was_drawn() -> None:
    """Step 1 sees only the prompt; the greedy draws are then counted on the device, step by step."""
    torch.manual_seed(0)
    s = seq([2, 2, 7], frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.5)
    plain = seq([2, 2, 7])
    sampler = Sampler(CPU)
    drawn: list[int] = []
    for _ in range(4):
        logits = torch.randn(2, VOCAB) * 3
        counts = torch.bincount(torch.tensor(drawn, dtype=torch.int64), minlength=VOCAB).float()
        seen = counts > 0
        seen[[2, 7]] = True  # the prompt's tokens, counted once whatever their multiplicity
        x = logits[1].clone()
        x = torch.where(seen, torch.where(x > 0, x / 1.5, x * 1.5), x) - 0.5 * counts - 0.25 * (counts > 0)
        assert torch.allclose(sampler.adjust_logits(logits.clone(), [plain, s])[1], x)
        tokens = sampler(logits, [plain, s])
        assert tokens.tolist() == [int(logits[0].argmax()), int(x.argmax())]
        drawn.append(int(tokens[1]))
    assert s.penalty_row is not None and plain.penalty_row is None
    counts = sampler.penalties.counts[s.penalty_row]
    assert counts.tolist() == torch.bincount(torch.tensor(drawn), minlength=VOCAB).tolist()


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sample = Sampler(CPU)
    drawn = {int(sample(logits, [seq([1], temperature=1.0, min_p=0.4, seed=i)])[0]) for i in range(64)}
    assert drawn == {0, 1}  # 0.15 < 0.4 x 0.5


@pytest.mark.parametrize(("options", "field"), [
    ({"min_p": 1.5}, "min_p"), ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logit_bias": ((VOCAB, 1.0),)}, "outside the vocabulary"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
])
def test_out_of_range_options_are_refused(options: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError, match=field):
        SamplingOptions(**options).check(VOCAB)  # type: ignore[arg-type]


def test_through_the_engine_bias_removes_the_greedy_token_and_penalties_stop_repeats() -> None:
    engine = tiny_engine("int4-bdr")
    ids = prompt(3, 9)
    greedy = run(engine, [GenerateParams("g", ids, max_new_tokens=12, ignore_eos=True)])["g"]
    banned = GenerateParams("b", ids, max_new_tokens=12, ignore_eos=True,
                            sampling=SamplingOptions(logit_bias=((greedy[0], -100.0),)))
    penalized = GenerateParams("p", ids, max_new_tokens=12, ignore_eos=True,
                               sampling=SamplingOptions(presence_penalty=2.0, frequency_penalty=2.0))
    out = run(engine, [banned, penalized])
    assert greedy[0] not in out["b"]
    assert len(set(out["p"])) > len(set(greedy))  # fewer repeats than greedy
    with pytest.raises(RequestError, match="min_p"):  # refused at submit; the engine serves on
        engine.submit(GenerateParams("x", ids, max_new_tokens=4, sampling=SamplingOptions(min_p=2.0)), Collector())
    assert len(run(engine, [GenerateParams("again", ids, max_new_tokens=4, ignore_eos=True)])["again"]) == 4


def test_a_finished_requests_table_row_is_taken_fresh_and_the_table_grows() -> None:
    """Rows are reused only once their request finished, without its counts; more live requests than rows grow
    the table and keep every request's counts."""
    sampler = Sampler(CPU)
    logits = torch.zeros(1, VOCAB)
    logits[0, 4] = 5.0
    first = seq([1], frequency_penalty=0.1)
    sampler(logits, [first])
    first.finished = True
    second = seq([1], presence_penalty=0.1)
    sampler(logits, [second])
    assert second.penalty_row == first.penalty_row
    assert sampler.penalties.counts[second.penalty_row].tolist() == [0] * 4 + [1] + [0] * (VOCAB - 5)
    live = [seq([1], frequency_penalty=0.1) for _ in range(20)]
    sampler(logits.expand(20, VOCAB), live)
    assert len({s.penalty_row for s in live} | {second.penalty_row}) == 21
    assert all(int(sampler.penalties.counts[s.penalty_row, 4]) == 1 for s in live + [second])


def reference_draw(logits: torch.Tensor, top_k: int, top_p: float, u: float) -> int:
    """One row, spelled out: keep the top-k, renormalize, drop tokens whose mass before them exceeds top_p,
    renormalize, and invert the CDF in the sorted order."""
    ranked, order = logits.sort(descending=True)
    probs = ranked.softmax(-1)
    if top_k:
        probs[top_k:] = 0
    probs = probs / probs.sum()
    probs[(probs.cumsum(-1) - probs) > top_p] = 0
    cdf = (probs / probs.sum()).cumsum(-1)
    return int(order[min(int((cdf < u).sum()), int((probs > 0).sum()) - 1)])


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (5, 1.0), (3, 0.5), (0, 1e-6), (200, 0.99)])
def test_top_k_and_top_p_draws_match_the_spelled_out_nucleus(top_k: int, top_p: float) -> None:
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(64, 200, generator=gen, dtype=torch.float64) * 2
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    got = _draw(logits, torch.full((64,), top_k), torch.full((64,), top_p, dtype=torch.float64), u).tolist()
    assert got == [reference_draw(logits[i], top_k, top_p, float(u[i])) for i in range(64)]
