import math
import random

import numpy as np
import pytest

from saw_loadtest.metrics import percentile, summarize
from saw_loadtest.records import RequestRecord


def rec(send, ttft, e2e, end, p_tok, c_tok, exp_in=100, exp_out=None, error=None, kind=None):
    return RequestRecord(
        label="x", conc=2, scenario="D(100,5)", expected_in=exp_in, expected_out=c_tok if exp_out is None else exp_out,
        send_ts=send, first_content_s=ttft, usage_s=e2e, end_s=end, prompt_tokens=p_tok, completion_tokens=c_tok,
        error=error, error_kind=kind,
    )  # fmt: skip


def test_hand_computed():
    records = [
        rec(100.0, 0.5, 2.5, 2.6, 100, 5),  # TPOT 0.5 s -> 2 tok/s; in/TTFT 200
        rec(100.2, 1.0, 3.0, 3.0, 100, 3, exp_out=4),  # TPOT 1.0 -> 1; in/TTFT 100; output count mismatch
        rec(101.0, 0.2, 1.2, 1.3, 100, 11),  # TPOT 0.1 -> 10; in/TTFT 500
        rec(102.0, None, None, 5.0, None, None, error="no complete response", kind="timeout"),  # ends at 107.0
    ]
    s = summarize(records, "x", 2, "D(100,5)")
    assert (s.requests_ok, s.requests_failed, s.timeouts) == (3, 1, 1)
    assert s.errors_by_kind == {"timeout": 1}
    assert (s.input_mismatch, s.output_mismatch) == (0, 1)
    assert s.wall_s == pytest.approx(7.0)  # first send 100.0 .. last end 107.0, failures included
    assert s.total_output_tokens == 19
    assert s.output_tps_job == pytest.approx(19 / 7)
    assert s.mean_output_tps_req == pytest.approx(13 / 3)
    assert s.mean_input_tps_req == pytest.approx(800 / 3)
    assert s.mean_ttft_ms == pytest.approx(1700 / 3)
    assert s.p90_ttft_ms == pytest.approx(900.0)
    assert s.mean_tpot_ms == pytest.approx(1600 / 3)
    assert s.e2e_mean_s == pytest.approx(6.7 / 3)
    assert s.e2e_p75_s == pytest.approx(2.75)
    assert s.e2e_p90_s == pytest.approx(2.9)
    assert s.first_error == "no complete response"


def test_single_output_token_has_no_tpot():
    s = summarize([rec(0.0, 0.1, 0.1, 0.1, 10, 1, exp_in=10)], "x", 1, "D(10,1)")
    assert s.requests_ok == 1 and math.isnan(s.mean_output_tps_req)
    assert s.output_tps_job == pytest.approx(10.0)  # 1 token in 0.1 s


def test_no_success_gives_nan_not_crash():
    s = summarize([rec(0.0, None, None, 1.0, None, None, error="HTTP 500", kind="http")], "x", 1, "D(1,1)")
    assert s.requests_ok == 0 and s.requests_failed == 1 and math.isnan(s.mean_ttft_ms)
    assert s.output_tps_job == 0.0


def test_percentile_matches_numpy():
    rng = random.Random(3)
    for n in (1, 2, 5, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 75, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(percentile([], 50))
