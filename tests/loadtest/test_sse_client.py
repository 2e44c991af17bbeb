from fake_server import FakeOptions, FakeServer

from saw_loadtest.records import RequestRecord
from saw_loadtest.server import free_port
from saw_loadtest.sse_client import chat_body, make_client, stream_chat


def run_one(url, n_out=8, timeout=10.0, content="Shall I compare thee to a summer's day?"):
    rec = RequestRecord(label="t", conc=1, scenario="D(1,1)", expected_in=0, expected_out=n_out)
    client = make_client(url, timeout)
    try:
        return stream_chat(client, chat_body("fake-model", content, n_out), rec, timeout=timeout)
    finally:
        client.close()


def test_records_every_chunk_and_usage(bpe):
    opts = FakeOptions(tokenizer=bpe, first_token_delay=0.05, token_delay=0.01)
    with FakeServer(opts) as srv:
        r = run_one(srv.url, n_out=8)
        body = opts.bodies[0]
    assert r.ok, r.error
    assert r.status == 200 and r.finish_reason == "length"
    assert (r.prompt_tokens, r.completion_tokens) == (opts.prompt_tokens(body["messages"][0]["content"]), 8)
    assert len(r.chunk_s) == 8 and r.chunk_s == sorted(r.chunk_s)
    assert r.first_content_s == r.chunk_s[0] >= 0.05  # the empty role chunk does not count as first content
    # Causal bound: the last chunk cannot arrive before the server sent it (gaps between arrivals
    # may shrink when a loaded client reads several chunks at once, so they are not checked).
    assert r.chunk_s[-1] >= 0.05 + 7 * 0.01
    assert r.chunk_s[-1] <= r.usage_s <= r.end_s
    assert r.send_ts > 1e9
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 8


def test_keep_alive_connection_is_reused(bpe):
    with FakeServer(FakeOptions(tokenizer=bpe)) as srv:
        client = make_client(srv.url, 10.0)
        for _ in range(3):
            rec = RequestRecord(label="t", conc=1, scenario="", expected_in=0, expected_out=2)
            assert stream_chat(client, chat_body("m", "hi", 2), rec, timeout=10.0).ok
        client.close()


def test_http_error_is_recorded(bpe):
    with FakeServer(FakeOptions(tokenizer=bpe, fail_every=1)) as srv:
        r = run_one(srv.url)
    assert (r.ok, r.error_kind, r.status) == (False, "http", 500)
    assert "injected failure" in r.error


def test_missing_usage_is_an_error(bpe):
    with FakeServer(FakeOptions(tokenizer=bpe, include_usage=False)) as srv:
        r = run_one(srv.url)
    assert r.error_kind == "stream" and "usage" in r.error


def test_midstream_error_event(bpe):
    with FakeServer(FakeOptions(tokenizer=bpe, midstream_error=True)) as srv:
        r = run_one(srv.url)
    assert r.error_kind == "server" and "worker died" in r.error


def test_timeout(bpe):
    with FakeServer(FakeOptions(tokenizer=bpe, token_delay=0.2)) as srv:
        r = run_one(srv.url, n_out=20, timeout=0.5)
    assert r.error_kind == "timeout" and 0.5 <= r.end_s < 2.0


def test_connection_refused():
    r = run_one(f"http://127.0.0.1:{free_port()}")
    assert r.error_kind == "connection" and r.status == 0
