"""Locust users that stream chat completions in a closed loop and log every request to JSONL.

Run by the sweep driver (one or more headless `locust -f` processes per concurrency point), or by
hand: `locust -f python/saw_loadtest/locustfile.py --host http://127.0.0.1:30000 \
   --saw-prompts prompts.jsonl --saw-out raw.jsonl` (prompts from `saw-bench --write-prompts`).
Each process stops issuing requests after --saw-max-requests or --saw-duration, lets in-flight
requests finish, then quits by itself, so no request is cut off and lost.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import gevent
from locust import User, constant, events, task
from locust.exception import StopUser

from saw_loadtest.prompts import PromptItem, read_pool
from saw_loadtest.records import RequestRecord
from saw_loadtest.sse_client import chat_body, make_client, stream_chat

_LAG_PERIOD = 0.05  # s between event-loop lag samples


@events.init_command_line_parser.add_listener
def _add_args(parser) -> None:
    g = parser.add_argument_group("saw_loadtest")
    g.add_argument("--saw-prompts", required=True, help="prompt pool JSONL (prompt, in, out)")
    g.add_argument("--saw-out", required=True, help="raw per-request JSONL written by this process")
    g.add_argument("--saw-stats", default="", help="client-side stats JSON (CPU, event-loop lag)")
    g.add_argument("--saw-model", default="", help="model id in requests")
    g.add_argument("--saw-label", default="server", help="KV config label stored in each record")
    g.add_argument("--saw-conc", type=int, default=0, help="total concurrency of the point (all processes)")
    g.add_argument("--saw-scenario", default="", help="scenario text stored in each record")
    g.add_argument("--saw-part", type=int, default=0, help="this process's index")
    g.add_argument("--saw-parts", type=int, default=1, help="number of processes sharing the pool")
    g.add_argument("--saw-max-requests", type=int, default=0, help="requests this process issues; 0 = no cap")
    g.add_argument("--saw-duration", type=float, default=0.0, help="s after start to stop issuing; 0 = no cap")
    g.add_argument("--saw-start-at", type=float, default=0.0, help="epoch s when users start (aligns processes)")
    g.add_argument("--saw-timeout", type=float, default=1800.0, help="per-request timeout, s")
    g.add_argument("--saw-temperature", type=float, default=0.0)
    g.add_argument("--saw-api-key", default="", env_var="SAW_BENCH_API_KEY", help="Bearer token")


class _Run:
    """Process-wide state: prompt cursor, request budget, output file, client health."""

    def __init__(self, environment) -> None:
        o = environment.parsed_options
        self.opts = o
        self.environment = environment
        self.items: list[PromptItem] = list(read_pool(o.saw_prompts, o.saw_part, o.saw_parts))
        if not self.items:
            raise SystemExit(f"empty prompt pool {o.saw_prompts}")
        self.start_at = o.saw_start_at or time.time()
        self.deadline = self.start_at + o.saw_duration if o.saw_duration > 0 else float("inf")
        self.issued = 0
        self.expected = 0  # users in this process, known once spawning completes
        self.finished = 0
        self.out = open(o.saw_out, "a", encoding="utf-8", buffering=1)  # line-buffered: progress is visible
        self.lags: list[float] = []
        self.t0, self.cpu0 = time.monotonic(), time.process_time()
        gevent.spawn(self._watch_lag)

    def take(self) -> tuple[int, PromptItem] | None:
        o = self.opts
        if (o.saw_max_requests and self.issued >= o.saw_max_requests) or time.time() >= self.deadline:
            return None
        seq = self.issued
        self.issued += 1
        return seq, self.items[seq % len(self.items)]

    def user_done(self) -> None:
        self.finished += 1
        self.maybe_quit()

    def maybe_quit(self) -> None:
        if self.expected and self.finished >= self.expected:
            gevent.spawn(self.environment.runner.quit)  # not from a user greenlet, which quit() kills

    def _watch_lag(self) -> None:
        # A busy event loop delays every chunk timestamp: lag here means the client is saturated.
        while True:
            t = time.perf_counter()
            gevent.sleep(_LAG_PERIOD)
            self.lags.append(time.perf_counter() - t - _LAG_PERIOD)

    def write_stats(self) -> None:
        self.out.close()
        if not self.opts.saw_stats:
            return
        lags = sorted(self.lags) or [0.0]
        wall = time.monotonic() - self.t0
        stats = {
            "part": self.opts.saw_part,
            "requests": self.issued,
            "cpu_frac": (time.process_time() - self.cpu0) / wall if wall > 0 else 0.0,
            "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000.0,
            "lag_max_ms": lags[-1] * 1000.0,
        }
        with open(self.opts.saw_stats, "w", encoding="utf-8") as f:
            json.dump(stats, f)


_run: _Run | None = None


@events.test_start.add_listener
def _on_start(environment, **_kw) -> None:
    global _run
    _run = _Run(environment)


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_kw) -> None:
    if _run is not None:
        _run.expected = user_count
        _run.maybe_quit()


@events.quitting.add_listener
def _on_quit(environment, **_kw) -> None:
    if _run is not None:
        _run.write_stats()


class ChatUser(User):
    """One closed-loop client: next request as soon as the previous one ends."""

    wait_time = constant(0)

    def on_start(self) -> None:
        assert _run is not None
        o = _run.opts
        self._timeout = o.saw_timeout
        self._prefix = urlsplit(self.host).path.rstrip("/")
        self._client = make_client(self.host, self._timeout)
        gevent.sleep(max(0.0, _run.start_at - time.time()))

    def on_stop(self) -> None:
        self._client.close()
        if _run is not None:
            _run.user_done()

    @task
    def chat(self) -> None:
        assert _run is not None
        nxt = _run.take()
        if nxt is None:
            raise StopUser()
        seq, item = nxt
        o = _run.opts
        rec = RequestRecord(
            label=o.saw_label,
            conc=o.saw_conc or o.num_users,
            scenario=o.saw_scenario,
            expected_in=item.input_tokens,
            expected_out=item.output_tokens,
            proc=o.saw_part,
            seq=seq,
        )
        body = chat_body(o.saw_model, item.prompt, item.output_tokens, o.saw_temperature)
        stream_chat(
            self._client, body, rec, timeout=self._timeout, api_key=o.saw_api_key or None, path_prefix=self._prefix
        )
        if not rec.ok:  # the connection may be in any state after a failure: start a fresh one
            self._client.close()
            self._client = make_client(self.host, self._timeout)
        _run.out.write(rec.to_json() + "\n")
        self.environment.events.request.fire(
            request_type="POST",
            name="chat",
            response_time=(rec.end_s or 0.0) * 1000.0,
            response_length=len(rec.chunk_s),
            exception=None if rec.ok else RuntimeError(rec.error),
            context={},
        )
