"""bench/peer/roofline.py's bound and bench/peer/table.py's per-point columns, on hand-checkable numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "peer"))

from roofline import Ceilings, Model, bound_tps, kv_bytes_per_token, scenario_lengths  # noqa: E402
from table import rows  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# 1 GB of weights, 1 GFLOP per token, 1 MB of KV per token; 1,000 GB/s and 1,000 TFLOP/s
TOY = Model(layers=1, q_heads=1, kv_heads=1, head_dim=1, linear_params=500_000_000, weight_bytes=1_000_000_000)
CEIL = Ceilings(copy_gbps=1000.0, matmul_tflops=1000.0)


def test_a_memory_bound_point_reads_weights_and_kv_once_per_step() -> None:
    # 2 requests, prompt 10, output 2: prefill 2 x 10 GFLOP = 20 us; steps read 1 GB + 2 x (10 + j) MB
    got = bound_tps(TOY, CEIL, prompt=10, output=2, conc=2, kv_bytes=1e6, kv_tokens=None)
    attention = 2 * TOY.attention_flops(10, 0) / 1e15
    seconds = 20e-6 + attention + (1.020e9 + 1.022e9) / 1e12
    assert got == pytest.approx(4 / seconds)


def test_a_small_pool_runs_the_requests_in_waves() -> None:
    # 12 tokens per request, a pool of 12 tokens: two waves of one request, each reading 1 GB + (10 + j) MB
    got = bound_tps(TOY, CEIL, prompt=10, output=2, conc=2, kv_bytes=1e6, kv_tokens=12)
    seconds = 20e-6 + 2 * TOY.attention_flops(10, 0) / 1e15 + 2 * (1.010e9 + 1.011e9) / 1e12
    assert got == pytest.approx(4 / seconds)


def test_the_formats_bytes_per_token() -> None:
    model = Model.from_config(REPO / "configs" / "qwen3-8b")
    assert model.linear_params == 36 * (4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 12288) + 151936 * 4096
    elements = 2 * 36 * 8 * 128
    assert kv_bytes_per_token("vllm-auto", model) == 2 * elements
    assert kv_bytes_per_token("sglang-fp8_e4m3", model) == elements
    assert kv_bytes_per_token("saw bf16", model) == 2 * elements
    # INT4 codes (half a byte an element) and a (scale, lo) pair of fp16 per token and head, K and V
    assert kv_bytes_per_token("saw --engine sglang int4-bdr", model) == elements // 2 + 2 * 36 * 8 * 4
    assert scenario_lengths("D(16384, 1024)") == (16384, 1024)
    with pytest.raises(ValueError):
        scenario_lengths("U(1,2)/(3,4)")


def test_the_table_compares_each_row_with_the_best_peer_of_its_point(tmp_path: Path) -> None:
    def run(name: str, label: str, points: list[tuple[str, int, float]]) -> str:
        folder = tmp_path / name
        (folder / "logs").mkdir(parents=True)
        (folder / "logs" / f"{label}.log").write_text("max_total_num_tokens=1000000\n")
        summary = {"meta": {"date": "2026-12-06"}, "points": [
            {"label": label, "conc": c, "scenario": s, "output_tps_job": tps, "mean_ttft_ms": 1.0,
             "requests_ok": c, "requests_failed": 0} for s, c, tps in points]}
        (folder / "summary.json").write_text(json.dumps(summary))
        return str(folder)

    peer = run("peer", "sglang-fp8_e4m3", [("D(256,1024)", 256, 100.0), ("D(16384,1024)", 64, 10.0)])
    saw = run("saw", "int4-bdr", [("D(256,1024)", 256, 150.0), ("D(16384,1024)", 64, 13.0)])
    model = Model.from_config(REPO / "configs" / "qwen3-8b")
    table = rows([peer, f"{saw}:saw --engine sglang"], (model, Ceilings(4000.0, 800.0)))
    by = {(r["label"], r["conc"]): r for r in table}
    assert by[("saw --engine sglang int4-bdr", 256)]["vs_best_peer"] == 1.5
    assert by[("saw --engine sglang int4-bdr", 64)]["vs_best_peer"] == 1.3
    assert by[("sglang-fp8_e4m3", 64)]["kv_tokens"] == 1_000_000
    row = by[("saw --engine sglang int4-bdr", 64)]
    assert row["of_roofline"] == pytest.approx(13.0 / row["roofline_tps"], abs=1e-3)
