"""The whole sweep (driver + real Locust processes) against the fake server via --url."""

import json

import pytest
from fake_server import FakeOptions, FakeServer

from saw_loadtest.report import PAPER_COLUMNS
from saw_loadtest.sweep import main

PNG = b"\x89PNG\r\n\x1a\n"


def sweep(url, out, *extra):
    args = ["--url", url, "--label", "fake", "--scenario", "D(48,8)", "-c", "2", "3", "--duration", "30",
            "--max-requests", "3x", "--out", str(out), "--progress-every", "1", *extra]  # fmt: skip
    return main(args)


def load(out):
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


def test_sweep_tokenizer_mode(tmp_path, bpe, capsys):
    opts = FakeOptions(tokenizer=bpe, token_delay=0.005)
    with FakeServer(opts) as srv:
        assert sweep(srv.url, tmp_path, "--warmup-requests", "2", "--strict") == 0
    records, summary = load(tmp_path)
    assert len(records) == 2 * 3 + 3 * 3  # --max-requests 3x; warm-up requests are not in the results
    assert opts.served == len(records) + 2
    assert all(r["error"] is None and r["prompt_tokens"] == 48 and r["completion_tokens"] == 8 for r in records)
    assert len({r["send_ts"] for r in records}) == len(records)
    assert "tokenizer (GET /v1/tokenizer)" in summary["meta"]["prompt_counting"]
    points = summary["points"]
    assert [(p["conc"], p["requests_ok"], p["requests_failed"]) for p in points] == [(2, 6, 0), (3, 9, 0)]
    assert all(p["output_tps_job"] > 0 and p["input_mismatch"] == p["output_mismatch"] == 0 for p in points)
    table = (tmp_path / "table.md").read_text()
    assert "| " + " | ".join(PAPER_COLUMNS) + " |" in table
    assert "| fake | 3 |" in table
    for name in ("output_tps.png", "ttft.png", "e2e_p90.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "output_tps_job" in header and "e2e_p90_s" in header
    out = capsys.readouterr().out
    assert "[fake c=3]" in out and "requests done" in out  # console progress


def test_sweep_probe_mode_two_processes(tmp_path, bpe):
    opts = FakeOptions(tokenizer=bpe, serve_tokenizer=False)
    with FakeServer(opts) as srv:
        assert sweep(srv.url, tmp_path, "--warmup-requests", "0", "--processes", "2", "--strict") == 0
    records, summary = load(tmp_path)
    assert "probing" in summary["meta"]["prompt_counting"]
    assert all(r["error"] is None and r["prompt_tokens"] == 48 and r["completion_tokens"] == 8 for r in records)
    assert sorted({r["proc"] for r in records if r["conc"] == 3}) == [0, 1]
    assert [p["requests_ok"] for p in summary["points"]] == [6, 9]


def test_failures_are_counted_and_shown(tmp_path, bpe):
    opts = FakeOptions(tokenizer=bpe, fail_every=4)
    with FakeServer(opts) as srv:
        assert sweep(srv.url, tmp_path, "--warmup-requests", "0", "--strict") == 1
    records, summary = load(tmp_path)
    failed = [r for r in records if r["error"]]
    assert failed and all(r["status"] == 500 and r["error_kind"] == "http" for r in failed)
    assert sum(p["requests_failed"] for p in summary["points"]) == len(failed)
    assert sum(p["requests_ok"] + p["requests_failed"] for p in summary["points"]) == len(records) == 15
    checks = (tmp_path / "table.md").read_text().split("## Errors and checks")[1]
    assert "http: " in checks and "injected failure" in checks


def test_sigterm_stops_the_router(tmp_path):
    """`timeout` sends SIGTERM to saw-bench: the router it started (here a stand-in that never gets
    ready) must go with it, or it keeps the GPU busy for the next run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    pid_file = tmp_path / "router.pid"
    # The stand-in stops on SIGINT as the real router does, even where SIGINT is inherited ignored (a
    # shell's background job): otherwise saw-bench waits out its 60 s grace.
    router = (f"{sys.executable} -c \"import os,signal,time; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"open('{pid_file}','w').write(str(os.getpid())); time.sleep(600)\"")
    src = str(Path(__file__).resolve().parents[2] / "python")  # this tree, not an installed saw
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    bench = subprocess.Popen([sys.executable, "-m", "saw_loadtest", "--router-cmd", router, "--kv", "bf16",
                              "--scenario", "D(48,8)", "-c", "2", "--out", str(tmp_path / "out")], env=env)  # fmt: skip
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    router_pid = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(60) == 128 + signal.SIGTERM
    time.sleep(0.5)
    try:
        os.kill(router_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    if alive:
        os.kill(router_pid, signal.SIGKILL)
    assert not alive, "the router outlived saw-bench"


def test_saw_bench_without_its_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "locust" else real(name))
    assert main(["--scenario", "D(16,16)"]) == 2
    assert "pip install 'saw[bench]'" in capsys.readouterr().err
