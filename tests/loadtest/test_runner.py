import json

from fake_server import FakeOptions, FakeServer

from saw_loadtest.prompts import read_pool
from saw_loadtest.runner import auto_processes, saturation_warnings, split
from saw_loadtest.sweep import main


def test_split_is_even_and_complete():
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 4) == [1, 1, 0, 0]
    assert sum(split(257, 5)) == 257


def test_auto_processes_bounds(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert [auto_processes(c) for c in (8, 64, 65, 256, 2048)] == [1, 1, 2, 4, 15]
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert auto_processes(256) == 1


def test_saturation_is_reported(tmp_path):
    calm = {"part": 0, "cpu_frac": 0.3, "lag_p99_ms": 2.0}
    busy = {"part": 1, "cpu_frac": 0.97, "lag_p99_ms": 80.0}
    log = tmp_path / "locust.p0.log"
    log.write_text("WARNING/root: CPU usage above 90%! This may constrain your throughput\n")
    assert saturation_warnings([calm], []) == []
    out = saturation_warnings([calm, busy], [log])
    assert len(out) == 2 and "process 1 at 97% CPU" in out[0] and "--processes" in out[1]


def test_write_prompts_for_hand_run_locust(tmp_path, bpe):
    opts = FakeOptions(tokenizer=bpe)
    path = tmp_path / "pool.jsonl"
    with FakeServer(opts) as srv:
        rc = main(["--url", srv.url, "--scenario", "N(100,20)/(10,2)", "--max-requests", "7",
                   "--write-prompts", str(path)])  # fmt: skip
    assert rc == 0
    items = list(read_pool(path))
    assert len(items) == 7 and all(json.loads(line)["in"] for line in path.read_text().splitlines())
    assert all(opts.prompt_tokens(it.prompt) == it.input_tokens for it in items)
