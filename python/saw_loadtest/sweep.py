"""saw-bench: concurrency sweeps over KV formats with Locust, reported as the paper's tables.

  saw-bench --kv bf16 int4 int4-bdr --scenario "D(256,1024)" -- --model qwen3-8b --load-format dummy
  saw-bench --url http://127.0.0.1:30000 --label int4-bdr --scenario "D(16384,1024)" -c 8 16 32

Arguments after `--` go to every `saw-router` started. See docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import os
import platform
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

from . import openai_http
from .corpus import corpus_text
from .metrics import PointSummary, summarize
from .plots import write_plots
from .prompts import ProbePrompts, PromptSource, TokenizerPrompts, build_pool, calibrate_overhead, write_pool
from .report import paper_table, problems, write_outputs
from .runner import PointSpec, auto_processes, run_point
from .scenarios import Scenario, parse_scenario
from .server import RouterProcess
from .tokenizer_source import fetch_tokenizer, load_tokenizer_file


def _count_arg(text: str) -> tuple[int, bool]:
    """`200` or `4x` (times the concurrency)."""
    m = re.fullmatch(r"\s*(\d+)\s*(x?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected N or Nx, got {text!r}")
    return int(m.group(1)), bool(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saw-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument(
        "--kv",
        nargs="+",
        default=["bf16", "int4", "int4-bdr"],
        help="KV formats: one saw-router started per format (default: %(default)s)",
    )
    t.add_argument("--url", help="benchmark this running OpenAI-compatible server instead of starting saw-router")
    t.add_argument("--label", default="server", help="KV config label of the --url server's rows")
    t.add_argument("--router-cmd", default="saw-router", help="command that starts the router (default: %(default)s)")
    t.add_argument("--startup-timeout", type=float, default=1800.0, help="s to wait for /health and /v1/models")
    t.add_argument("--model-name", help="model id sent in requests (default: first of /v1/models)")
    t.add_argument("--api-key", default=os.environ.get("SAW_BENCH_API_KEY"), help="Bearer token ($SAW_BENCH_API_KEY)")
    w = p.add_argument_group("workload")
    w.add_argument("--scenario", default="D(256,1024)", help="D(in,out) | N(mi,si)/(mo,so) | U(a,b)/(c,d)")
    w.add_argument("-c", "--concurrency", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    w.add_argument("--duration", type=float, default=300.0, help="s per point before no new request starts")
    w.add_argument(
        "--max-requests",
        type=_count_arg,
        default=(0, False),
        help="requests per point: N, or Nx = N times the concurrency; 0 = only --duration caps",
    )
    w.add_argument(
        "--warmup-requests",
        type=int,
        default=-1,
        help="discarded requests before each format, at the lowest concurrency (default: that concurrency; 0 = none)",
    )
    w.add_argument("--request-timeout", type=float, default=1800.0, help="s per request before it counts as failed")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("client")
    c.add_argument("--processes", default="auto", help="Locust processes per point (default: 1 per 64 users)")
    c.add_argument(
        "--tokenizer",
        help="tokenizer.json (or its folder) of the served model; default: GET "
        "/v1/tokenizer, else count by probing the server",
    )
    c.add_argument("--probe-prompts", type=int, default=16, help="distinct prompts per length when probing")
    c.add_argument("--pool-size", type=int, default=1024, help="prompts per point when --max-requests is 0")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="output folder (default: bench/out/<UTC time>-<scenario>)")
    o.add_argument("--keep-work", action="store_true", help="keep per-point prompt pools and raw parts")
    o.add_argument("--progress-every", type=float, default=10.0, help="s between progress lines")
    o.add_argument(
        "--write-prompts",
        type=Path,
        help="with --url: write the prompt pool JSONL for a hand-run locustfile, then exit",
    )
    o.add_argument("--strict", action="store_true", help="exit 1 on any failed request or token-count mismatch")
    return p


class PromptState:
    """Prompt source for the model being served, reused across formats of one sweep."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.source: PromptSource | None = None
        self.method = ""
        self.model = ""

    def attach(self, base: str, model: str, api_key: str | None) -> PromptSource:
        count = openai_http.prompt_counter(base, model, api_key)
        if isinstance(self.source, ProbePrompts) and model == self.model:
            self.source.count_prompt = count  # same model: earlier probe results still hold
            return self.source
        tok = load_tokenizer_file(self.args.tokenizer) if self.args.tokenizer else fetch_tokenizer(base, api_key)
        if tok is not None:
            prompts = TokenizerPrompts(tok, corpus_text())
            try:
                overhead = calibrate_overhead(prompts, count)
                where = self.args.tokenizer or "GET /v1/tokenizer"
                self.source, self.method = prompts, f"tokenizer ({where}), chat template overhead {overhead} tokens"
            except ValueError as e:
                print(f"warning: {e}; counting by probing the server instead", flush=True)
                tok = None
        if tok is None:
            self.source = ProbePrompts(count, corpus_text(), distinct=self.args.probe_prompts)
            self.method = f"probing usage.prompt_tokens ({self.args.probe_prompts} distinct prompts per length)"
        self.model = model
        return self.source


def _requests_for(args: argparse.Namespace, conc: int) -> int:
    n, per_user = args.max_requests
    return n * conc if per_user else n


def _processes(args: argparse.Namespace, conc: int) -> int:
    return auto_processes(conc) if args.processes == "auto" else int(args.processes)


class Sweep:
    def __init__(self, args: argparse.Namespace, scenario: Scenario, passthrough: list[str]) -> None:
        self.args = args
        self.scenario = scenario
        self.passthrough = passthrough
        self.out: Path = args.out
        self.prompts = PromptState(args)
        self.summaries: list[PointSummary] = []
        self.warnings: list[str] = []
        self.meta = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["saw-bench", *sys.argv[1:]]),
            "scenario": str(scenario),
            "client_host": f"{platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()})",
        }

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "requests.jsonl").write_text("")
        setup_failed = False
        targets = [(self.args.label, None)] if self.args.url else [(kv, kv) for kv in self.args.kv]
        for label, kv in targets:
            try:
                self._run_target(label, kv)
            except (openai_http.ServerError, OSError, RuntimeError, ValueError) as e:
                setup_failed = True
                self.warnings.append(f"{label}: not measured: {e}")
                print(f"error: {label}: {e}", file=sys.stderr, flush=True)
        self._write()
        print("\n" + paper_table(self.summaries) + f"\n\nresults in {self.out}/", flush=True)
        issues = problems(self.summaries)
        for line in issues + self.warnings:
            print(f"warning: {line}", flush=True)
        if setup_failed:
            return 2
        return 1 if self.args.strict and issues else 0

    def _run_target(self, label: str, kv: str | None) -> None:
        a = self.args
        server = None
        if kv is not None:
            server = RouterProcess(a.router_cmd, kv, self.passthrough, self.out / "logs" / f"router_{kv}.log")
            print(f"[{label}] starting: {shlex.join(server.cmd)}", flush=True)
            self.meta.setdefault("servers", {})[label] = shlex.join(server.cmd)
        with server or contextlib.nullcontext():
            base = server.url if server else a.url.rstrip("/")
            try:
                model = openai_http.wait_ready(
                    base, a.startup_timeout, a.api_key, alive=server.alive if server else lambda: True
                )
            except openai_http.ServerError as e:
                tail = server.log_tail() if server else ""
                raise openai_http.ServerError(f"{e}\n{tail}") from e
            model = a.model_name or model
            source = self.prompts.attach(base, model, a.api_key)
            self.meta.update(url=base, model=model, prompt_counting=self.prompts.method)
            print(f"[{label}] ready: model {model}; prompt lengths by {self.prompts.method}", flush=True)
            index = 0  # corpus position: every request of a format gets its own prompt
            warm = a.warmup_requests if a.warmup_requests >= 0 else min(a.concurrency)
            if warm:
                print(f"[{label}] warm-up: {warm} requests at concurrency {min(a.concurrency)} (discarded)", flush=True)
                self._point(base, model, label, min(a.concurrency), warm, index, source, warmup=True)
                index += warm
            for conc in a.concurrency:
                n = _requests_for(a, conc) or a.pool_size
                self._point(base, model, label, conc, _requests_for(a, conc), index, source)
                index += n
            if server:
                print(f"[{label}] stopping the router", flush=True)

    def _point(
        self,
        base: str,
        model: str,
        label: str,
        conc: int,
        max_requests: int,
        first_index: int,
        source: PromptSource,
        warmup: bool = False,
    ) -> None:
        a = self.args
        pool = build_pool(
            self.scenario, max_requests or a.pool_size, source, seed=a.seed * 1_000_003 + conc, first_index=first_index
        )
        name = f"{label}_c{conc}" + ("_warmup" if warmup else "")
        spec = PointSpec(
            url=base, model=model, label=label, scenario=str(self.scenario), conc=conc, pool=pool,
            work_dir=self.out / "work" / name, max_requests=max_requests, duration=a.duration,
            processes=_processes(a, conc), request_timeout=a.request_timeout, temperature=a.temperature,
            api_key=a.api_key, progress_every=a.progress_every,
        )  # fmt: skip
        if not warmup:
            cap = f"{max_requests} requests or " if max_requests else ""
            print(
                f"[{label}] concurrency {conc}: {cap}{a.duration:g} s, {spec.processes} locust process(es)", flush=True
            )
        result = run_point(spec)
        if not a.keep_work:  # records are in memory now; pools of long prompts are large
            for f in [*spec.work_dir.glob("prompts.jsonl"), *spec.work_dir.glob("raw.p*.jsonl")]:
                f.unlink()
        if warmup:
            failed = sum(not r.ok for r in result.records)
            if failed:
                self.warnings.append(f"{label}: {failed} of {len(result.records)} warm-up requests failed")
            return
        with open(self.out / "requests.jsonl", "a", encoding="utf-8") as f:
            for r in result.records:
                f.write(r.to_json() + "\n")
        s = summarize(result.records, label, conc, str(self.scenario))
        s.warnings = result.warnings
        self.summaries.append(s)
        print(
            f"  [{label} c={conc}] {s.requests_ok} ok, {s.requests_failed} failed, "
            f"output_tps(job) {s.output_tps_job:.1f}, mean TTFT {s.mean_ttft_ms:.0f} ms, "
            f"wall {s.wall_s:.1f} s",
            flush=True,
        )
        for w in result.warnings:
            print(f"  warning: {w}", flush=True)
        self._write()  # partial results survive a crash later in the sweep

    def _write(self) -> None:
        self.meta["warnings"] = self.warnings
        write_outputs(self.out, self.summaries, self.meta)
        if self.summaries:
            write_plots(self.out, self.summaries, str(self.scenario))


def _write_prompts(args: argparse.Namespace, scenario: Scenario) -> int:
    base = args.url.rstrip("/")
    model = args.model_name or openai_http.wait_ready(base, args.startup_timeout, args.api_key)
    state = PromptState(args)
    source = state.attach(base, model, args.api_key)
    n = _requests_for(args, max(args.concurrency)) or args.pool_size
    write_pool(args.write_prompts, build_pool(scenario, n, source, seed=args.seed))
    print(f"{n} prompts for {scenario} ({state.method}) -> {args.write_prompts}")
    return 0


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the router and its workers are stopped,
    instead of being left holding the GPU for the next run."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    missing = [m for m in ("locust", "gevent", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"saw-bench needs {', '.join(missing)}: pip install 'saw[bench]'", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    try:
        scenario = parse_scenario(args.scenario)
    except ValueError as e:
        build_parser().error(str(e))
    if args.write_prompts:
        if not args.url:
            build_parser().error("--write-prompts needs --url")
        return _write_prompts(args, scenario)
    if not args.url and shutil.which(shlex.split(args.router_cmd)[0]) is None:
        build_parser().error(f"{args.router_cmd!r} not found on PATH (install saw, or use --url)")
    if args.out is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = Path("bench/out") / f"{stamp}-{scenario.slug}"
    return Sweep(args, scenario, passthrough).run()


if __name__ == "__main__":
    raise SystemExit(main())
