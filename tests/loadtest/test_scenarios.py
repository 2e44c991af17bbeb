import random

import pytest

from saw_loadtest.scenarios import parse_scenario


def test_deterministic():
    s = parse_scenario("D(256,1024)")
    assert (s.kind, s.input, s.output) == ("D", (256, 0), (1024, 0))
    assert str(s) == "D(256,1024)" and s.slug == "D_256_1024"
    rng = random.Random(0)
    assert {s.sample(rng) for _ in range(20)} == {(256, 1024)}


def test_spaces_and_case():
    assert parse_scenario(" d( 32 , 16 ) ") == parse_scenario("D(32,16)")
    assert str(parse_scenario("u(1, 5) / (2,3)")) == "U(1,5)/(2,3)"


def test_normal_draws_round_and_clamp():
    s = parse_scenario("N(480,240)/(300,150)")
    assert (s.kind, s.input, s.output) == ("N", (480, 240), (300, 150))
    rng = random.Random(1)
    draws = [s.sample(rng) for _ in range(4000)]
    ins = [d[0] for d in draws]
    assert all(isinstance(v, int) and v >= 1 for d in draws for v in d)
    assert abs(sum(ins) / len(ins) - 480) < 15  # ~4 standard errors (240 / sqrt(4000) = 3.8)
    tiny = parse_scenario("N(2,50)/(1,50)")
    assert min(min(tiny.sample(rng)) for _ in range(500)) == 1  # clamped, never 0 or negative


def test_uniform_inclusive_bounds():
    s = parse_scenario("U(10,12)/(1,2)")
    rng = random.Random(2)
    draws = {s.sample(rng) for _ in range(500)}
    assert {d[0] for d in draws} == {10, 11, 12} and {d[1] for d in draws} == {1, 2}
    assert s.max_input == 12


def test_same_seed_same_draws():
    s = parse_scenario("U(1,1000)/(1,1000)")
    a, b = random.Random(7), random.Random(7)
    assert [s.sample(a) for _ in range(10)] == [s.sample(b) for _ in range(10)]


@pytest.mark.parametrize(
    "bad",
    ["", "D(1)", "D(1,2,3)", "X(1,2)", "D(0,5)", "D(5,0)", "D(1.5,2)", "U(5,1)/(1,2)", "U(1,2)", "N(1,2)/(3)",
     "D(-1,2)", "D(1,2)/(3,4)"],
)  # fmt: skip
def test_rejects(bad):
    with pytest.raises(ValueError):
        parse_scenario(bad)
