"""End to end: `saw-router` with real CPU workers (smollm2-135m, int4-bdr KV), driven by the official
openai client and raw HTTP. Each router runs as a subprocess; teardown stops it and checks that no
worker process survives it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
import requests
from openai import OpenAI
from tokenizers import Tokenizer

from saw_worker.proto import saw_pb2

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
KV = os.environ.get("SAW_E2E_KV", "int4-bdr")
STARTUP_TIMEOUT = 600
# "Answer in one word." matters with 4-bit KV on this 135M model: asked bare, the first answer
# token is a near-tie under bf16 ("The" p=0.157 vs "L" p=0.140), so INT4 noise can tip greedy
# int4 / int4-bdr into French prose (see docs/accuracy.md).
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _router_command() -> list[str]:
    """The saw-router of this interpreter's environment (e.g. a venv with this checkout), else one on PATH."""
    beside = Path(sys.executable).parent / "saw-router"
    exe = str(beside) if beside.exists() else shutil.which("saw-router")
    return [exe] if exe else [sys.executable, "-c", "from saw_router import main; main()"]


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Router:
    def __init__(self, workers: int, flags: tuple[str, ...] = ("--kv", KV), env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="saw-router-", suffix=".log", delete=False)
        self.worker_count = workers
        cmd = _router_command() + ["--workers", str(workers), "--model", MODEL, "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, **env or {}))
        self.workers: list[int] = []

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until every worker takes requests: /health is 200 as soon as the first one does, and a test that
        measures how load is spread must not start while the other is still loading."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"saw-router exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200 and self._all_healthy():
                    self.workers = _children(self.proc.pid)
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"saw-router not ready in {STARTUP_TIMEOUT}s:\n{self.output()[-4000:]}")

    def _all_healthy(self) -> bool:
        m = self.metrics()
        return all(m.get(f'saw_worker_healthy{{worker="{i}"}}') == 1 for i in range(self.worker_count))

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def metrics(self) -> dict[str, float]:
        text = requests.get(f"{self.url}/metrics", timeout=5).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("saw-router did not stop within 60s of SIGTERM")
        assert code == 0, self.output()[-4000:]
        time.sleep(0.5)
        left = [pid for pid in self.workers if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"worker processes outlived the router: {left}"
        # Stopped workers exit quietly: no traceback, no engine "crash".
        out = self.output()
        assert "Traceback" not in out and "engine process exited" not in out, out[-4000:]


@pytest.fixture(scope="module")
def router():
    r = Router(workers=1)
    try:
        r.wait_ready()
        assert len(r.workers) == 1, r.output()
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def router2():
    r = Router(workers=2)
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


API_KEY = "e2e-k3y"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """A router whose API key comes from a file (not argv), with a short stall timeout."""
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(API_KEY + "\n")
    r = Router(workers=1, flags=("--kv", KV, "--api-key-file", str(key_file), "--worker-stall-timeout-secs", "2"))
    try:
        r.wait_ready()
        assert API_KEY not in Path(f"/proc/{r.proc.pid}/cmdline").read_text()
        yield r
    finally:
        r.stop()


def test_api_key_from_a_file_any_bearer_case(guarded: Router) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    resp = requests.post(f"{guarded.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    for scheme in ("Bearer", "bearer"):
        resp = requests.post(f"{guarded.url}/v1/completions", json=body, timeout=60,
                             headers={"Authorization": f"{scheme} {API_KEY}"})
        assert resp.status_code == 200, resp.text


def test_the_worker_port_refuses_callers_without_the_token(guarded: Router) -> None:
    url = requests.get(f"{guarded.url}/health", timeout=5).json()["workers"][0]["url"]
    assert url.startswith("http://127.0.0.1:")
    with grpc.insecure_channel(url.removeprefix("http://")) as channel:
        info = channel.unary_unary("/saw.v1.Worker/Info", saw_pb2.InfoRequest.SerializeToString,
                                   saw_pb2.InfoReply.FromString)
        with pytest.raises(grpc.RpcError) as err:
            info(saw_pb2.InfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The token reached the worker through its environment, not its command line.
    cmdline = Path(f"/proc/{guarded.workers[0]}/cmdline").read_text()
    assert "token" not in cmdline.lower()


def test_a_frozen_worker_fails_its_stream_and_gets_the_abort_when_back(guarded: Router) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    worker = guarded.workers[0]
    with requests.post(f"{guarded.url}/v1/completions", json=body, headers=headers, stream=True, timeout=60) as resp:
        lines = (line for line in resp.iter_lines() if line)
        assert next(lines).startswith(b"data: {")
        os.kill(worker, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            rest = list(lines)
            waited = time.monotonic() - stopped
        finally:
            os.kill(worker, signal.SIGCONT)
    # Out of rotation after two 2 s poll timeouts, then 2 s (--worker-stall-timeout-secs) without a chunk.
    assert waited < 12, waited
    assert rest[-1] == b"data: [DONE]"
    error = json.loads(rest[-2][len(b"data: "):])["error"]
    assert error["code"] == "worker_stalled", error
    # Back: it takes requests again, and the stalled request was dropped there with its KV.
    deadline = time.monotonic() + 30
    while True:
        m = guarded.metrics()
        if m['saw_worker_healthy{worker="0"}'] == 1 and m['saw_worker_running_requests{worker="0"}'] == 0 \
                and m['saw_worker_kv_tokens_used{worker="0"}'] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.25)
    assert m['saw_e2e_request_latency_seconds_count{finish_reason="abort"}'] >= 1, m


def test_models(router: Router) -> None:
    models = router.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_logit_bias_and_penalties_steer_the_output(router: Router) -> None:
    """Through the real stack: -100 on the greedy answer's first token takes it away, +100 on one token makes
    every token that one, and repetition penalties cut the repeats of a prompt that asks for them."""
    client = router.client()
    tok = Tokenizer.from_str(requests.get(f"{router.url}/v1/tokenizer", timeout=10).text)

    def chat(content: str, **extra: object) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                               max_tokens=24, temperature=0, extra_body=extra)
        return reply.choices[0].message.content or ""

    greedy = chat(QUESTION[0]["content"])
    first = tok.encode(greedy, add_special_tokens=False).ids[0]
    assert not tok.encode(chat(QUESTION[0]["content"], logit_bias={str(first): -100}),
                          add_special_tokens=False).ids[:1] == [first]
    forced = tok.token_to_id("Paris")
    assert chat("Say hello.", logit_bias={str(forced): 100}, ignore_eos=True) == "Paris" * 24

    def repeats(text: str) -> int:
        """Tokens that repeat an earlier one (not the count of the most repeated: the text comes back through the
        tokenizer, which may split a few newlines differently from how they were sampled)."""
        ids = tok.encode(text, add_special_tokens=False).ids
        return len(ids) - len(set(ids))

    # negative penalties make a token more likely each time it is said, positive ones less
    encouraged = chat("List some fruits.", ignore_eos=True, frequency_penalty=-2.0, presence_penalty=-2.0)
    penalized = chat("List some fruits.", ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert repeats(penalized) < repeats(encouraged), (encouraged, penalized)


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                         "population_millions": {"type": "integer", "minimum": 0, "maximum": 2000}},
        "required": ["city", "population_millions"], "additionalProperties": False}
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Italy", "Egypt", "Peru", "Norway"]


def test_json_mode_and_json_schema_always_parse(router: Router) -> None:
    """20 prompts at once under a strict schema: every answer is an object of that schema (the schema bounds
    its length, so each ends by itself); JSON mode: every answer that ends by itself parses as an object
    (a 135M model may go on adding keys until max_tokens)."""
    client = router.client()
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}

    def ask(i: int, fmt: object) -> tuple[str, str]:
        country = COUNTRIES[i % len(COUNTRIES)]
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=96, temperature=i // 10 * 0.7, seed=i, response_format=fmt,  # type: ignore
            messages=[{"role": "user", "content": f"Give the capital of {country} and its population as JSON."}])
        return reply.choices[0].finish_reason, reply.choices[0].message.content or ""

    with ThreadPoolExecutor(20) as pool:
        schema_answers = list(pool.map(lambda i: ask(i, schema_format), range(20)))
        object_answers = list(pool.map(lambda i: ask(i, {"type": "json_object"}), range(10)))
    for i, (finish, text) in enumerate(schema_answers):
        assert finish == "stop", (i, text)
        value = json.loads(text)
        assert set(value) == {"city", "population_millions"} and isinstance(value["city"], str), (i, text)
        assert 0 <= value["population_millions"] <= 2000
    ended = [text for finish, text in object_answers if finish == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended), object_answers


def test_guided_choice_and_regex_streaming(router: Router) -> None:
    client = router.client()
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, stream=True,
                                            extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text in ("Paris", "Lyon", "Nice")
    reply = client.completions.create(model=MODEL, prompt="The year the Eiffel Tower opened:", max_tokens=8,
                                      extra_body={"guided_regex": "1[0-9]{3}"})
    assert re.fullmatch("1[0-9]{3}", reply.choices[0].text), reply.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:  # a schema that does not compile: 400 from the worker
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"guided_regex": "a(b"})
    assert "regex" in str(bad.value)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}


def test_tool_calls_forced_streamed_and_round_tripped(router: Router) -> None:
    """tool_choice required / named: the answer is a call with arguments of the tool's schema, as
    tool_calls (whole and streamed); the call and its result then go back into the history."""
    client = router.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER],  # type: ignore[list-item]
                                               tool_choice=choice, max_tokens=48, temperature=0)  # type: ignore
        out = reply.choices[0]
        assert out.finish_reason == "tool_calls" and out.message.tool_calls, out
        call = out.message.tool_calls[0]
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    stream = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required",  # type: ignore
                                            max_tokens=48, temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert json.loads(deltas[0].function.arguments or "") == json.loads(call.function.arguments)
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],  # type: ignore
                                           max_tokens=24, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER],  # type: ignore
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_n_choices_and_batched_prompts(router: Router) -> None:
    """n = 3 gives three choices of one prompt, counted once in usage (the copies start once the first has
    its first token, and take the prompt's pages from the prefix cache); a list of prompts (lm-eval's
    batches) gives one choice per prompt, in order."""
    client = router.client()
    one = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=3, temperature=1.0,
                                           seed=11)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    prompts = ["The capital of France is", "Two plus two is", "The sky is"]
    # echo puts each prompt before its answer: choice i must answer prompt i (the texts themselves may differ
    # from single requests in low bits: a batch multiplies other matrix shapes in bf16)
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, echo=True,
                                      extra_body={"ignore_eos": True})
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert all(c.text.startswith(p) and len(c.text) > len(p) for c, p in zip(batch.choices, prompts, strict=True))
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 12


def test_unknown_fields_and_models_are_refused(router: Router) -> None:
    client = router.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"max_token": 5})
    assert bad.value.body["param"] == "max_token"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_answer(router: Router) -> None:
    reply = router.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    content = reply.choices[0].message.content
    assert content is not None and "Paris" in content, content
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_chat_stream_with_usage(router: Router) -> None:
    stream = router.client().chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text, text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_a_repeated_prompt_comes_from_the_prefix_cache(router: Router) -> None:
    client = router.client()
    messages = [{"role": "user", "content": "Name three colors of the rainbow, one per line, and nothing else."}]
    first, second, third = (client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                           temperature=0) for _ in range(3))
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 16
    # every full 16-token page before the prompt's last token is shared
    assert second.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // 16 * 16
    # two hits on the same pages compute the same thing (the first request may read less of its prompt from INT4:
    # its own prefill attends at bf16, so its greedy text may differ in a late token)
    assert third.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens_details.cached_tokens
    assert third.choices[0].message.content == second.choices[0].message.content


def test_completion_and_stop_string(router: Router) -> None:
    client = router.client()
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    text = full.choices[0].text
    assert "Paris" in text, text
    cut = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["Par"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index("Par")]


def test_echo_logprobs_score_the_prompt(router: Router) -> None:
    reply = router.client().completions.create(
        model=MODEL, prompt="The capital of France is Paris.", max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == "The capital of France is Paris."
    assert len(lp.tokens) == reply.usage.prompt_tokens == len(lp.token_logprobs)
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == reply.choices[0].text


def test_32_concurrent_streams(router: Router) -> None:
    client = router.client()

    def one(i: int) -> tuple[str, str]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            max_tokens=16,
            temperature=0.7,
            seed=i,
            stream=True,
        )
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(finish in ("stop", "length") for _, finish in results), results
    assert sum(1 for text, _ in results if text) >= 30


def test_disconnect_frees_the_worker(router: Router) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with requests.post(f"{router.url}/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert any(next(lines).startswith(b"data: {") for _ in range(6))
        # The worker's load (polled every 0.5 s) shows the request while it runs.
        deadline = time.monotonic() + 10
        while router.metrics()['saw_worker_running_requests{worker="0"}'] < 1:
            assert time.monotonic() < deadline, "the running request never showed in /metrics"
            time.sleep(0.1)
    # Leaving the block closed the connection mid-stream: the worker must drop the request and its KV.
    running, kv_used = 'saw_worker_running_requests{worker="0"}', 'saw_worker_kv_tokens_used{worker="0"}'
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = router.metrics()
        if m[running] == 0 and m[kv_used] == 0 and m['saw_worker_inflight_requests{worker="0"}'] == 0:
            break
        time.sleep(0.25)
    m = router.metrics()
    assert m[running] == 0, m
    assert m[kv_used] == 0, m
    assert m['saw_worker_waiting_requests{worker="0"}'] == 0, m
    assert m['saw_worker_inflight_requests{worker="0"}'] == 0, m
    assert m["saw_running_requests"] == 0, m


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", "{not json", 400),
        ("/v1/chat/completions", json.dumps({"messages": "hi"}), 400),
        ("/v1/chat/completions", json.dumps({"messages": QUESTION, "temperature": 9}), 400),
        ("/v1/chat/completions", json.dumps({"messages": QUESTION, "n": 17}), 400),
        ("/v1/completions", json.dumps({"prompt": "hello " * 10000}), 400),
        ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -1}), 400),
        ("/v1/nothing", "{}", 404),
    ],
)
def test_bad_requests(router: Router, path: str, body: str, status: int) -> None:
    resp = requests.post(f"{router.url}{path}", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and {"type", "param", "code"} <= err.keys()


def test_two_workers_share_the_load(router2: Router) -> None:
    """The prompts share their chat template's long prefix, so the default cache-aware policy keeps them on
    one worker until it has 9 more in flight than the other. Each request is long enough (48 tokens) that
    16 at once really are in flight together: with 8-token answers a fast worker could finish each before
    the next arrived, and serve all 24."""
    client = router2.client()

    def one(i: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Question {i}: name a color."}],
            max_tokens=48,
            extra_body={"ignore_eos": True},
        )
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(24)))
    m = router2.metrics()
    served = [m.get(f'saw_worker_requests_total{{worker="{i}"}}', 0) for i in range(2)]
    assert sum(served) == 24 and min(served) > 0, served
    assert len(router2.workers) == 2


def test_worker_flags_and_sglang_aliases_reach_the_worker() -> None:
    """The worker resolves --kv-cache-dtype, HADAMARD, HADAMARD_ORDER and ROTATE_V from the router's environment;
    flags after `--` reach it as they are (here: no prefix cache)."""
    flags = ("--kv-cache-dtype", "int4", "--k-center", "false", "--", "--no-prefix-cache")
    r = Router(workers=1, flags=flags, env={"HADAMARD": "1", "HADAMARD_ORDER": "16", "ROTATE_V": "yes"})
    try:
        r.wait_ready()
        formats = [k for k in r.metrics() if k.startswith("saw_worker_kv_bytes{")]
        assert formats and all('format="int4-bdr:b16+rotv+scale+s4+w16"' in k for k in formats), formats
        client = r.client()
        messages = [{"role": "user", "content": "Name three colors of the rainbow, one per line, and nothing else."}]
        for _ in range(2):
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
            assert reply.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        r.stop()


def test_sigterm_drains_open_streams() -> None:
    r = Router(workers=1)
    try:
        r.wait_ready()
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": True}
        with requests.post(f"{r.url}/v1/completions", json=body, stream=True, timeout=120) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line).startswith(b"data: {")
            r.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        # The open stream ran to its end after the signal.
        assert rest[-1] == b"data: [DONE]"
        finish = json.loads(rest[-2][len(b"data: ") :])["choices"][0]["finish_reason"]
        assert finish == "length"
        assert r.proc.wait(timeout=60) == 0
    finally:
        r.stop()
