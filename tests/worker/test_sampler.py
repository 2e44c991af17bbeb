"""The sampler's logit bias, penalties and min-p against direct computations, and through the engine."""

from __future__ import annotations

import pytest
import torch
from engine_util import Collector, prompt, run, tiny_engine

from saw_worker.engine.request import GenerateParams, RequestError, SamplingOptions, Sequence
from saw_worker.engine.sampler import adjust_logits, sample

VOCAB = 11


def seq(prompt_ids: list[int], **options: object) -> Sequence:
    return Sequence(GenerateParams("r", prompt_ids, max_new_tokens=8, sampling=SamplingOptions(**options)),
                    sink=lambda ev: None, order=0)


def test_requests_without_options_keep_their_logits() -> None:
    logits = torch.randn(2, VOCAB)
    assert adjust_logits(logits, [seq([1]), seq([2])]) is logits


def test_logit_bias_adds_to_its_row_only() -> None:
    logits = torch.randn(2, VOCAB)
    got = adjust_logits(logits, [seq([1]), seq([1], logit_bias=((3, -100.0), (5, 2.5)))])
    want = logits.clone()
    want[1, 3] -= 100
    want[1, 5] += 2.5
    assert torch.equal(got, want) and not torch.equal(logits, want)


def test_penalties_follow_the_openai_and_vllm_formulas_and_count_what_was_drawn() -> None:
    """Step 1 sees only the prompt; the greedy draws are then counted on the device, step by step."""
    torch.manual_seed(0)
    s = seq([2, 2, 7], frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.5)
    plain = seq([2, 2, 7])
    drawn: list[int] = []
    for _ in range(4):
        logits = torch.randn(2, VOCAB) * 3
        counts = torch.bincount(torch.tensor(drawn, dtype=torch.int64), minlength=VOCAB).float()
        seen = counts > 0
        seen[[2, 7]] = True  # the prompt's tokens, counted once whatever their multiplicity
        x = logits[1].clone()
        x = torch.where(seen, torch.where(x > 0, x / 1.5, x * 1.5), x) - 0.5 * counts - 0.25 * (counts > 0)
        assert torch.allclose(adjust_logits(logits, [plain, s])[1], x)
        tokens = sample(logits, [plain, s])
        assert tokens.tolist() == [int(logits[0].argmax()), int(x.argmax())]
        drawn.append(int(tokens[1]))
    assert s.penalty_state is not None and plain.penalty_state is None
    assert s.penalty_state.output_counts.tolist() == torch.bincount(torch.tensor(drawn), minlength=VOCAB).tolist()


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
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
