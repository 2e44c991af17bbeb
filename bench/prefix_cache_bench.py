"""Time to first token of a long prompt, cold and then from the prefix cache, through the whole stack.

    python bench/prefix_cache_bench.py [--words 4000] [--kv int4-bdr] [-- worker flags, e.g. --model configs/qwen3-8b
        --load-format dummy]

Starts `saw-router --workers 1` on a free port and sends, one at a time and each with max_tokens=1: a
warm-up prompt of the same length (the first long prefill compiles kernels), a long prompt (cold), the
same prompt again (its full pages come from the cache), the same prefix with a new question (a
conversation's next turn), and a fresh prompt of the same length (cold again). It prints the latency and
usage.prompt_tokens_details.cached_tokens of each.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> dict:
    """GET (no body) or POST JSON; the reply's JSON. Standard library only: the lent GPU has no openai."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"saw-router exited with {proc.returncode}")
        try:
            return call(f"{base}/models")["data"][0]["id"]
        except OSError:  # not up yet
            time.sleep(2)
    sys.exit("saw-router did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--words", type=int, default=4000, help="words in the long prompt")
    ap.add_argument("--kv", default="int4-bdr")
    ap.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    port = free_port()
    extra = [a for a in args.worker_args if a != "--"]
    proc = subprocess.Popen(["saw-router", "--workers", "1", "--kv", args.kv, "--port", str(port), *extra])
    try:
        base = f"http://127.0.0.1:{port}/v1"
        model = wait_ready(base, proc)
        text = " ".join(f"item{i}" for i in range(args.words))
        fresh = " ".join(f"entry{i}" for i in range(args.words))
        warm = " ".join(f"piece{i}" for i in range(args.words))
        cases = [("warm-up (compiles kernels)", warm, "Which piece comes first?"),
                 ("cold", text, "Which item comes first?"), ("same prompt again", text, "Which item comes first?"),
                 ("same prefix, new question", text, "Which item comes last?"),
                 ("fresh prompt, cold", fresh, "Which entry comes first?")]
        print("| case | prompt tokens | cached tokens | latency ms (max_tokens=1) |\n|---|---|---|---|")
        for name, body, question in cases:
            started = time.perf_counter()
            usage = call(f"{base}/chat/completions", dict(
                model=model, max_tokens=1, temperature=0,
                messages=[{"role": "user", "content": f"{body}\n\n{question}"}]))["usage"]
            ms = (time.perf_counter() - started) * 1e3
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            print(f"| {name} | {usage['prompt_tokens']} | {cached} | {ms:.1f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
