"""PNG plots of a sweep: throughput and latency against concurrency, one line per KV config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import PointSummary  # noqa: E402


def _by_label(summaries: Sequence[PointSummary]) -> dict[str, list[PointSummary]]:
    out: dict[str, list[PointSummary]] = {}
    for s in summaries:
        out.setdefault(s.label, []).append(s)
    return {k: sorted(v, key=lambda s: s.conc) for k, v in out.items()}


def _plot(
    path: Path, summaries: Sequence[PointSummary], series: list[tuple[str, str, str]], ylabel: str, title: str
) -> None:
    """series: (attribute, legend suffix, line style)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    concs = sorted({s.conc for s in summaries})
    for label, pts in _by_label(summaries).items():
        color = None
        for attr, suffix, style in series:
            (line,) = ax.plot(
                [p.conc for p in pts],
                [getattr(p, attr) for p in pts],
                style,
                marker="o",
                color=color,
                label=label + suffix,
            )
            color = line.get_color()  # same color for a KV config's series
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(out: Path, summaries: Sequence[PointSummary], scenario: str) -> list[Path]:
    paths = [out / "output_tps.png", out / "ttft.png", out / "e2e_p90.png"]
    _plot(
        paths[0],
        summaries,
        [("output_tps_job", "", "-")],
        "output tokens/s (job)",
        f"output_tps(job) vs concurrency, {scenario}",
    )
    _plot(
        paths[1],
        summaries,
        [("mean_ttft_ms", " mean", "-"), ("p90_ttft_ms", " p90", "--")],
        "TTFT (ms)",
        f"TTFT vs concurrency, {scenario}",
    )
    _plot(paths[2], summaries, [("e2e_p90_s", "", "-")], "E2E latency p90 (s)", f"E2E p90 vs concurrency, {scenario}")
    return paths
