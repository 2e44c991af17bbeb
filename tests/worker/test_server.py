"""`python -m saw_worker` as a process, spoken to over gRPC exactly as the router does."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from saw_worker.proto import health_pb2, saw_pb2

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        def unary(name: str, req, rep):  # noqa: ANN001, ANN202
            return channel.unary_unary(f"/saw.v1.Worker/{name}", req.SerializeToString, rep.FromString)

        self.info = unary("Info", saw_pb2.InfoRequest, saw_pb2.InfoReply)
        self.load = unary("Load", saw_pb2.LoadRequest, saw_pb2.LoadReply)
        self.abort = unary("Abort", saw_pb2.AbortRequest, saw_pb2.AbortReply)
        self.generate = channel.unary_stream("/saw.v1.Worker/Generate", saw_pb2.GenerateRequest.SerializeToString,
                                             saw_pb2.GenerateChunk.FromString)
        self.health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                          health_pb2.HealthCheckRequest.SerializeToString,
                                          health_pb2.HealthCheckResponse.FromString)


@contextlib.contextmanager
def running_worker() -> Iterator[tuple[subprocess.Popen, Client]]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    proc = subprocess.Popen([sys.executable, "-m", "saw_worker", "--model", "smollm2-135m", "--kv", "int4-bdr",
                             "--kv-cache-memory", "64MiB", "--port", str(port)], env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = Client(channel)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                client.info(saw_pb2.InfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                assert proc.poll() is None, "worker exited during start-up"
                assert time.monotonic() < deadline, "worker did not become ready"
                time.sleep(0.5)
        yield proc, client
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker() -> Iterator[Client]:
    with running_worker() as (_, client):
        yield client


def wait_idle(client: Client) -> saw_pb2.LoadReply:
    for _ in range(100):
        load = client.load(saw_pb2.LoadRequest())
        if load.running == 0 and load.waiting == 0:
            return load
        time.sleep(0.05)
    return load


def test_info_describes_model_and_cache(worker: Client) -> None:
    info = worker.info(saw_pb2.InfoRequest())
    assert info.model_id == "smollm2-135m" and info.kv_format == "int4-bdr:b32+center+scale+s4+w16"
    # 30 layers x 3 KV heads x (32 + 4) bytes for K and for V; the ring: 4 sinks + 16 bf16 tokens of K and V each,
    # and the sink store's entry (4 more) that comes with it
    assert info.kv_bytes_per_token == 30 * 3 * 72
    assert info.kv_window_bytes_per_request == 30 * 3 * 2 * (20 + 4) * 64 * 2
    assert '"model"' in info.tokenizer_json and "im_start" in info.chat_template
    assert info.kv_capacity_tokens > 1000 and info.page_size == 16 and info.context_length >= 2048
    assert list(info.eos_token_ids)
    assert worker.health(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_generate_streams_tokens_then_usage(worker: Client) -> None:
    req = saw_pb2.GenerateRequest(id="g1", input_ids=[1, 504, 3458, 282, 4649, 314], max_new_tokens=8,
                                  ignore_eos=True, logprobs=2)
    chunks = list(worker.generate(req))
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 8
    assert chunks[-1].finished == saw_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.prompt_tokens == 6 and chunks[-1].usage.completion_tokens == 8
    assert all(len(c.logprobs) == len(c.token_ids) and len(c.logprobs[0].top) == 2 for c in chunks)


@pytest.mark.parametrize("req,needle", [
    (saw_pb2.GenerateRequest(id="b1", input_ids=[], max_new_tokens=4), "empty"),
    (saw_pb2.GenerateRequest(id="b2", input_ids=[1, 10**7], max_new_tokens=4), "vocabulary"),
    (saw_pb2.GenerateRequest(id="b3", input_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
    (saw_pb2.GenerateRequest(id="b4", input_ids=[1, 2], max_new_tokens=4,
                             sampling=saw_pb2.SamplingParams(temperature=float("nan"))), "temperature"),
])
def test_bad_requests_get_invalid_argument(worker: Client, req: saw_pb2.GenerateRequest, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(worker.generate(req))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    ok = list(worker.generate(saw_pb2.GenerateRequest(id=f"after-{req.id}", input_ids=[1, 2], max_new_tokens=2)))
    assert ok[-1].finished != saw_pb2.FINISH_REASON_UNSPECIFIED


def test_cancelled_stream_frees_its_kv(worker: Client) -> None:
    stream = worker.generate(saw_pb2.GenerateRequest(id="c1", input_ids=[1, 2, 3], max_new_tokens=5000,
                                                     ignore_eos=True))
    next(stream)
    assert worker.load(saw_pb2.LoadRequest()).running == 1
    stream.cancel()
    load = wait_idle(worker)
    assert load.running == 0 and load.kv_tokens_used == 0


def test_abort_ends_the_stream(worker: Client) -> None:
    stream = worker.generate(saw_pb2.GenerateRequest(id="a1", input_ids=[1, 2, 3], max_new_tokens=5000,
                                                     ignore_eos=True))
    next(stream)
    assert worker.abort(saw_pb2.AbortRequest(id="a1")).found
    last = list(stream)[-1]
    assert last.finished == saw_pb2.FINISH_REASON_ABORT
    assert wait_idle(worker).kv_tokens_used == 0


def test_engine_process_crash_fails_streams_and_exits_the_worker() -> None:
    """The engine runs in a child process; if it dies, running requests end with an error and the
    worker exits non-zero so that the router's supervisor restarts it."""
    with running_worker() as (proc, client):
        stream = client.generate(saw_pb2.GenerateRequest(id="k1", input_ids=[1, 2, 3], max_new_tokens=5000,
                                                         ignore_eos=True))
        next(stream)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        engines = [pid for pid in children if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(engines) == 1
        os.kill(int(engines[0]), signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert "engine process exited" in err.value.details()
        assert proc.wait(timeout=30) != 0


def test_a_model_that_cannot_load_ends_the_worker_with_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    done = subprocess.run([sys.executable, "-m", "saw_worker", "--model", str(tmp_path / "missing"),
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "saw_worker: error:" in done.stderr and "missing" in done.stderr


def test_sigterm_to_the_process_group_stops_the_worker_quietly(tmp_path: Path) -> None:
    """The router stops a worker with SIGTERM to its process group, which the engine process gets too: the
    worker still shuts down in order and exits 0, without errors or tracebacks. The token it was given in
    SAW_WORKER_TOKEN guards its port meanwhile."""
    port, log = free_port(), tmp_path / "worker.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), SAW_WORKER_TOKEN="t0k")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "saw_worker", "--model", "smollm2-135m", "--kv", "int4-bdr",
                                 "--kv-cache-memory", "64MiB", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "ready:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = Client(channel)
            with pytest.raises(grpc.RpcError) as err:
                client.info(saw_pb2.InfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert client.info(saw_pb2.InfoRequest(), timeout=5, metadata=(("authorization", "Bearer t0k"),))
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text and "error:" not in text, text
