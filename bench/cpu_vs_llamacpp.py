"""saw against llama.cpp on the CPU, on the same GGUF and thread count, one server at a time.

    pip install llama-cpp-python[server]    # builds llama.cpp (a few minutes)
    python bench/cpu_vs_llamacpp.py --models smollm2-135m qwen2.5-coder-0.5b --kv int4-bdr bf16

For each model it starts `saw-router --workers 1 --kv K` (each `--kv`), then `python -m llama_cpp.server`
on the alias's GGUF, with the same number of threads (the worker uses every core: --threads defaults to
the core count), and drives each through its OpenAI `/v1/completions` with greedy requests:
  - single-stream decode: tokens/s of one request after its first token (--decode-tokens, the mean of
    --repeats requests);
  - TTFT of a --prompt-tokens prompt (cut from the pinned stdlib corpus, counted with the model's tokenizer);
  - 4-stream throughput: --streams requests at once, output tokens / wall time.
Prints one table (with saw ÷ llama.cpp) and writes it as JSON and Markdown under --out. `--saw-args` passes worker
flags (e.g. `--saw-args=--cpu-compile` for the compiled decode step), `--skip-llamacpp` measures saw alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saw_eval.corpus import load_corpus  # noqa: E402
from saw_worker.loader.aliases import resolve_alias  # noqa: E402

QUESTION = "Once upon a time"  # a base-model continuation that runs on: greedy reaches no end within 128 tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port, stopped on exit; `model` is the name its API serves."""

    def __init__(self, cmd: list[str], port: int, model: str, env: dict[str, str] | None = None) -> None:
        self.url, self.model = f"http://127.0.0.1:{port}", model
        self.log = tempfile.NamedTemporaryFile(prefix="cpu-bench-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited:\n{Path(self.log.name).read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/v1/models", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{cmd[0]} not ready in 900 s")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def complete(self, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        """One streamed greedy completion: (TTFT s, end s, output tokens: from usage, else one per text chunk,
        as llama.cpp's server streams them)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        ttft, chunks, usage = None, 0, None
        with requests.post(f"{self.url}/v1/completions", json=body, stream=True, timeout=900) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - sent
                usage = chunk.get("usage") or usage
        end = time.perf_counter() - sent
        tokens = usage["completion_tokens"] if usage else chunks
        return (ttft if ttft is not None else end), end, tokens


def measure(server: Server, long_prompts: list[str], decode_tokens: int, streams: int, repeats: int
            ) -> dict[str, float]:
    server.complete("Hello", 4)  # warm-up
    rates = []
    for _ in range(repeats):
        ttft, end, n = server.complete(QUESTION, decode_tokens)
        rates.append((n - 1) / (end - ttft) if n > 1 and end > ttft else 0.0)
    # each prompt once: a second run of the same one would be served from the prefix cache (both engines have one)
    ttft_long = min(server.complete(prompt, 1)[0] for prompt in long_prompts)
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: server.complete(QUESTION, decode_tokens), range(streams)))
    wall = time.perf_counter() - started
    return {"decode_tok_s": sum(rates) / len(rates), "ttft_long_s": ttft_long,
            f"{streams}_stream_tok_s": sum(n for _, _, n in results) / wall}


def long_prompts(tokenizer: Tokenizer, n_tokens: int, count: int = 2) -> list[str]:
    """count prompts of n_tokens tokens from distinct parts of the pinned corpus (no shared prefix)."""
    ids = tokenizer.encode("".join(f.text for f in load_corpus()), add_special_tokens=False).ids
    return [tokenizer.decode(ids[i * n_tokens:(i + 1) * n_tokens]) for i in range(count)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    p.add_argument("--kv", nargs="+", default=["int4-bdr"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out/cpu-vs-llamacpp")
    p.add_argument("--saw-args", nargs="*", default=[], metavar="FLAG",
                   help="worker flags for saw (e.g. --saw-args=--cpu-compile), after the router's `--`")
    p.add_argument("--skip-llamacpp", action="store_true", help="saw only (ratios to llama.cpp left out)")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for model in args.models:
        gguf = resolve_alias(model)
        for kv in args.kv:
            port = free_port()
            cmd = ["saw-router", "--workers", "1", "--kv", kv, "--model", model, "--port", str(port),
                   *(["--", *args.saw_args] if args.saw_args else [])]
            with Server(cmd, port, model, env) as saw:
                tok = Tokenizer.from_str(requests.get(f"{saw.url}/v1/tokenizer", timeout=30).text)
                prompts = long_prompts(tok, args.prompt_tokens)
                rows.append({"model": model, "engine": f"saw --kv {kv}",
                             **measure(saw, prompts, args.decode_tokens, args.streams, args.repeats)})
            print(rows[-1], flush=True)
        if args.skip_llamacpp:
            continue
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model,
               "--n_threads", str(args.threads), "--n_ctx", "4096", "--port", str(port)]
        with Server(cmd, port, model, env) as llama:
            rows.append({"model": model, "engine": "llama.cpp",
                         **measure(llama, prompts, args.decode_tokens, args.streams, args.repeats)})
        print(rows[-1], flush=True)
    multi = f"{args.streams}_stream_tok_s"
    lines = [f"| model | engine | decode tok/s (1 stream) | TTFT {args.prompt_tokens}-token prompt s | "
             f"{args.streams}-stream tok/s | decode ÷ llama.cpp | {args.streams}-stream ÷ llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["engine"] == "llama.cpp"), None)
        ratios = (f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r[multi] / base[multi]:.2f}" if base
                  else "– | –")
        lines.append(f"| {r['model']} | {r['engine']} | {r['decode_tok_s']:.1f} | {r['ttft_long_s']:.2f} | "
                     f"{r[multi]:.1f} | {ratios} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "command": " ".join(sys.argv), "args": vars(args)}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
