"""CI end to end: a short sweep against the real saw-router with smollm2-135m on CPU."""

import json
import shutil

import pytest

from saw_loadtest.report import PAPER_COLUMNS
from saw_loadtest.sweep import main

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("saw-router") is None, reason="saw-router not on PATH (pip install . first)")
def test_short_sweep_bf16_and_int4_bdr(tmp_path):
    rc = main([
        "--kv", "bf16", "int4-bdr", "--scenario", "D(32,16)", "-c", "2", "4", "--duration", "4",
        "--warmup-requests", "2", "--request-timeout", "120", "--out", str(tmp_path), "--strict",
        "--", "--model", "smollm2-135m", "--workers", "1", "--device", "cpu",
    ])  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, summary["meta"]["warnings"]  # --strict: any failure or token-count mismatch fails
    points = summary["points"]
    assert [(p["label"], p["conc"]) for p in points] == [("bf16", 2), ("bf16", 4), ("int4-bdr", 2), ("int4-bdr", 4)]
    for p in points:
        assert p["requests_ok"] >= p["conc"] and p["requests_failed"] == 0
        assert p["input_mismatch"] == 0 and p["output_mismatch"] == 0 and p["output_tps_job"] > 0
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert all(r["prompt_tokens"] == 32 and r["completion_tokens"] == 16 for r in records)
    assert len(records) == sum(p["requests_ok"] for p in points)
    table = (tmp_path / "table.md").read_text()
    assert "| " + " | ".join(PAPER_COLUMNS) + " |" in table and "| int4-bdr | 4 |" in table
    for name in ("output_tps.png", "ttft.png", "e2e_p90.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert (tmp_path / "logs" / "router_int4-bdr.log").exists()
