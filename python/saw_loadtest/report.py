"""Sweep outputs: Markdown table with the paper's columns, checks table, CSV and JSON summaries."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .metrics import PointSummary

PAPER_COLUMNS = [
    "KV config",
    "Conc",
    "output_tps(job)",
    "mean_input_tps(req)",
    "mean_output_tps(req)",
    "mean_ttft(req) ms",
    "E2E mean/p75/p90 s",
    "total requests",
    "Wall s",
]


def _f(x: float, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def paper_row(s: PointSummary) -> list[str]:
    return [
        s.label,
        str(s.conc),
        _f(s.output_tps_job),
        _f(s.mean_input_tps_req),
        _f(s.mean_output_tps_req),
        _f(s.mean_ttft_ms),
        f"{_f(s.e2e_mean_s, 2)} / {_f(s.e2e_p75_s, 2)} / {_f(s.e2e_p90_s, 2)}",
        str(s.requests_ok),
        _f(s.wall_s),
    ]


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def paper_table(summaries: Sequence[PointSummary]) -> str:
    return _md(PAPER_COLUMNS, [paper_row(s) for s in summaries])


def checks_table(summaries: Sequence[PointSummary]) -> str:
    """Failures, timeouts and usage-count mismatches per point: nothing is dropped silently."""
    header = ["KV config", "Conc", "failed", "timeouts", "errors by kind", "in≠scenario", "out≠scenario", "notes"]
    rows = []
    for s in summaries:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors_by_kind.items())) or "–"
        notes = "; ".join(s.warnings + ([f"first error: {s.first_error}"] if s.first_error else [])) or "–"
        rows.append([
            s.label, str(s.conc), str(s.requests_failed), str(s.timeouts), kinds,
            str(s.input_mismatch), str(s.output_mismatch), notes.replace("|", "/").replace("\n", " "),
        ])  # fmt: skip
    return _md(header, rows)


def problems(summaries: Sequence[PointSummary]) -> list[str]:
    """One line per point that had failures or token-count mismatches (for the console and exit code)."""
    out = []
    for s in summaries:
        bad = []
        if s.requests_failed:
            bad.append(f"{s.requests_failed} failed ({s.timeouts} timeouts)")
        if s.input_mismatch or s.output_mismatch:
            bad.append(f"token counts off scenario: {s.input_mismatch} inputs, {s.output_mismatch} outputs")
        if bad:
            out.append(f"{s.label} c={s.conc}: " + ", ".join(bad))
    return out


def markdown_report(summaries: Sequence[PointSummary], meta: dict) -> str:
    lines = [f"# Load test: {meta.get('scenario', '')}", ""]
    for key in ("date", "command", "url", "model", "prompt_counting", "client_host"):
        if meta.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{meta[key]}`")
    for label, cmd in meta.get("servers", {}).items():
        lines.append(f"- server for {label}: `{cmd}`")
    lines += ["", paper_table(summaries), "", "## Errors and checks", "", checks_table(summaries), ""]
    lines += [f"- {w}" for w in meta.get("warnings", [])]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(out: Path, summaries: Sequence[PointSummary], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_report(summaries, meta), encoding="utf-8")
    rows = [s.as_dict() for s in summaries]
    nan_free = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "points": nan_free}, f, indent=2, default=str)
    if rows:
        with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
