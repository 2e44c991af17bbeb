"""GPQA driver equivalent to openai/simple-evals' gpqa_eval.py: same prompt template, same `Answer: X`
regex, answer order permuted with random.Random(0) (one permutation per example per repeat, drawn in
the same order simple-evals draws them), n repeats, temperature / top_p. The CSV is user-supplied
(simple-evals downloads gpqa_diamond.csv; we never fetch it)."""

from __future__ import annotations

import csv
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from saw_eval.client import Client

QUERY_TEMPLATE_MULTICHOICE = """
Answer the following multiple choice question. The last line of your response should be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering.

{Question}

A) {A}
B) {B}
C) {C}
D) {D}
""".strip()  # noqa: E501 - verbatim from simple-evals

ANSWER_PATTERN_MULTICHOICE = r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?"


def extract_answer(response: str) -> str | None:
    """As simple-evals: first match, letter case kept (a lowercase letter then scores 0 there too)."""
    m = re.search(ANSWER_PATTERN_MULTICHOICE, response)
    return m.group(1) if m else None


def load_examples(csv_path: Path, n_repeats: int, num_examples: int | None) -> list[dict[str, Any]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        examples = list(csv.DictReader(f))
    rng = random.Random(0)
    if num_examples:
        examples = rng.sample(examples, num_examples)
    examples = examples * n_repeats
    return [ex | {"permutation": rng.sample(range(4), 4)} for ex in examples]


def make_question(row: dict[str, Any]) -> tuple[str, str]:
    """(prompt, correct letter) for one example under its permutation."""
    choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"],
               row["Incorrect Answer 3"]]
    choices = [choices[i] for i in row["permutation"]]
    correct = "ABCD"[choices.index(row["Correct Answer"])]
    fields = dict(A=choices[0], B=choices[1], C=choices[2], D=choices[3], Question=row["Question"])
    return QUERY_TEMPLATE_MULTICHOICE.format(**fields), correct


def evaluate(client: Client, csv_path: Path, n_repeats: int, num_examples: int | None, temperature: float,
             top_p: float, max_tokens: int, concurrency: int, label: str) -> dict[str, Any]:
    examples = load_examples(csv_path, n_repeats, num_examples)

    def one(row: dict[str, Any]) -> dict[str, Any]:
        prompt, correct = make_question(row)
        reply, finish = client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                    temperature=temperature, top_p=top_p)
        got = extract_answer(reply)
        return {"correct": correct, "extracted": got, "score": float(got == correct), "finish_reason": finish,
                "reply": reply}

    with ThreadPoolExecutor(concurrency) as ex:
        rows = list(tqdm(ex.map(one, examples), total=len(examples), desc=f"gpqa {label}", unit="q"))
    n = len(rows)
    return {"examples": n, "n_repeats": n_repeats, "score": round(sum(r["score"] for r in rows) / n, 4),
            "no_answer": sum(r["extracted"] is None for r in rows), "temperature": temperature, "top_p": top_p,
            "samples": rows}
