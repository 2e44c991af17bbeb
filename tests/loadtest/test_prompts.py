import pytest
from fake_server import TEMPLATE

from saw_loadtest.corpus import corpus_text
from saw_loadtest.prompts import (
    ProbePrompts,
    TemplateTooLong,
    TokenizerPrompts,
    build_pool,
    calibrate_overhead,
    read_pool,
    write_pool,
)
from saw_loadtest.scenarios import parse_scenario


def server_counter(tok):
    """What a server reports as usage.prompt_tokens: the whole rendered chat prompt, tokenized."""
    return lambda content: len(tok.encode(TEMPLATE.format(content=content), add_special_tokens=False).ids)


def test_corpus_is_long_public_domain_text():
    text = corpus_text()
    assert 20_000 < len(text) < 400_000 and text.endswith("\n")
    assert text.startswith("From fairest creatures we desire increase")


@pytest.mark.parametrize("which", ["bpe", "wordlevel"])
def test_exact_lengths_at_any_start(which, request):
    tok = request.getfixturevalue(which)
    tp = TokenizerPrompts(tok, corpus_text())
    for n in (1, 2, 3, 7, 64, 513, 4096, 16384):  # 16384 > corpus: the text repeats
        for start in (0, 1, 7919, 123_457):
            text = tp.text(n, start)
            assert len(tok.encode(text, add_special_tokens=False).ids) == n
            assert text == text.strip()


def test_prompts_differ_from_the_first_token(bpe):
    tp = TokenizerPrompts(bpe, corpus_text())
    heads = {tp.prompt(200, i)[:20] for i in range(50)}
    assert len(heads) == 50  # no shared prefix: a prefix cache cannot flatter the results


def test_calibrated_overhead_gives_exact_server_counts(bpe):
    count = server_counter(bpe)
    tp = TokenizerPrompts(bpe, corpus_text())
    overhead = calibrate_overhead(tp, count)
    assert overhead == count("") and overhead > 0
    for total in (overhead + 1, 32, 100, 2000):
        for i in range(5):
            assert count(tp.prompt(total, i)) == total
    with pytest.raises(TemplateTooLong):
        tp.prompt(overhead, 0)


def test_wrong_tokenizer_is_caught(bpe, wordlevel):
    tp = TokenizerPrompts(wordlevel, corpus_text())
    with pytest.raises(ValueError, match="disagrees"):
        calibrate_overhead(tp, server_counter(bpe))


def test_probe_prompts_exact_without_tokenizer(bpe):
    count = server_counter(bpe)
    pp = ProbePrompts(count, corpus_text(), distinct=3)
    overhead = count("")
    for total in (overhead + 1, overhead + 2, 40, 333, 5000):
        for i in range(4):
            assert count(pp.prompt(total, i)) == total
    probes = pp.probes
    assert probes / (5 * 3) < 20  # a handful of server requests per distinct prompt
    pp.prompt(40, 5)  # index 5 -> 5 % 3 == 2: cached, no new probes
    assert pp.probes == probes
    with pytest.raises(TemplateTooLong):
        pp.prompt(overhead, 0)


def test_pool_roundtrip_and_parts(tmp_path, bpe):
    tp = TokenizerPrompts(bpe, corpus_text())
    pool = build_pool(parse_scenario("U(5,50)/(1,9)"), 10, tp, seed=4)
    assert pool == build_pool(parse_scenario("U(5,50)/(1,9)"), 10, tp, seed=4)  # reproducible
    assert all(tp.count(it.prompt) == it.input_tokens and 1 <= it.output_tokens <= 9 for it in pool)
    path = tmp_path / "pool.jsonl"
    write_pool(path, pool)
    assert list(read_pool(path)) == pool
    parts = [list(read_pool(path, p, 3)) for p in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted((it for p in parts for it in p), key=pool.index) == pool


def test_probe_first_guess_stays_near_the_target():
    """One token per byte (the dummy Qwen3 tokenizer): probes must not overshoot past the context length."""
    overhead = 9
    seen = []

    def count(content):
        seen.append(overhead + len(content.encode()))
        return seen[-1]

    pp = ProbePrompts(count, corpus_text(), distinct=2)
    for total in (10, 300, 16384):
        assert count(pp.prompt(total, 0)) == total
        assert max(seen) <= total * 1.05 + 1100  # the 1024-char calibration probe aside
        seen.clear()
