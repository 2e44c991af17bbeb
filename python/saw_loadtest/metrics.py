"""Per-point aggregation with genai-bench's definitions (docs/loadtest.md, Metric definitions).

TTFT = first non-empty content chunk - send; E2E = usage chunk - send;
TPOT = (E2E - TTFT) / (out - 1); mean_output_tps(req) = mean of 1/TPOT;
mean_input_tps(req) = mean of in/TTFT; output_tps(job) = sum of output tokens / run wall time,
where the run spans the first send to the last response end (failed requests included).
Only successful requests enter the latency and throughput numbers; failures are counted apart.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .records import RequestRecord

NAN = float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return NAN
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


@dataclass
class PointSummary:
    label: str
    conc: int
    scenario: str
    requests_ok: int
    requests_failed: int
    timeouts: int
    errors_by_kind: dict[str, int]
    input_mismatch: int  # usage.prompt_tokens != scenario input
    output_mismatch: int  # usage.completion_tokens != scenario output
    wall_s: float
    total_input_tokens: int
    total_output_tokens: int
    output_tps_job: float
    mean_input_tps_req: float
    mean_output_tps_req: float
    mean_ttft_ms: float
    p90_ttft_ms: float
    mean_tpot_ms: float
    e2e_mean_s: float
    e2e_p75_s: float
    e2e_p90_s: float
    mean_cached_tokens: float
    first_error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], label: str, conc: int, scenario: str) -> PointSummary:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    kinds = Counter(r.error_kind or "unknown" for r in failed)

    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    out_tokens = [r.completion_tokens or 0 for r in ok]
    in_tokens = [r.prompt_tokens or 0 for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.completion_tokens - 1) for r in ok if (r.completion_tokens or 0) > 1]
    input_tps = [(r.prompt_tokens or 0) / r.ttft for r in ok if r.ttft]
    output_tps = [1.0 / t for t in tpot if t > 0]

    if records:
        wall = max(r.end_ts for r in records) - min(r.send_ts for r in records)
    else:
        wall = NAN
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return PointSummary(
        label=label,
        conc=conc,
        scenario=scenario,
        requests_ok=len(ok),
        requests_failed=len(failed),
        timeouts=kinds.get("timeout", 0),
        errors_by_kind=dict(kinds),
        input_mismatch=sum(1 for r in ok if r.prompt_tokens != r.expected_in),
        output_mismatch=sum(1 for r in ok if r.completion_tokens != r.expected_out),
        wall_s=wall,
        total_input_tokens=sum(in_tokens),
        total_output_tokens=sum(out_tokens),
        output_tps_job=sum(out_tokens) / wall if wall and wall > 0 else NAN,
        mean_input_tps_req=mean(input_tps),
        mean_output_tps_req=mean(output_tps),
        mean_ttft_ms=mean(ttft) * 1000.0,
        p90_ttft_ms=percentile(ttft, 90) * 1000.0,
        mean_tpot_ms=mean(tpot) * 1000.0,
        e2e_mean_s=mean(e2e),
        e2e_p75_s=percentile(e2e, 75),
        e2e_p90_s=percentile(e2e, 90),
        mean_cached_tokens=mean(cached),
        first_error=failed[0].error if failed else None,
    )
