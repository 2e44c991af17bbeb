"""Our serving sweeps against the paper's SGLang table (its rows are PAPER below): one Markdown
table with the ratios and target checks, and one PNG per scenario (ours solid, paper dashed).

    python bench/compare_paper.py bench/results/serving-h100-2026-11-23-D256/summary.csv \\
        bench/results/serving-h100-2026-11-23-D16k/summary.csv --out bench/results/paper-comparison-h100-2026-11-23
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KVS = ("bf16", "int4", "int4-bdr")
# output_tps(job), SGLang with the paper's kernels on one H100, Qwen3-8B: (bf16, int4, int4-bdr b=128)
PAPER: dict[str, dict[int, tuple[float, float, float]]] = {
    "D(256,1024)": {32: (3795, 3687, 3689), 64: (5950, 6371, 6235), 128: (8410, 9544, 9350),
                    256: (11195, 11624, 11732)},
    "D(16384,1024)": {8: (414, 458, 457), 16: (481, 571, 568), 32: (570, 618, 616), 64: (471, 666, 663),
                      128: (559, 701, 701)},
}
# int4-bdr >= bf16 from this concurrency up, by this factor (issue 7's targets)
BDR_OVER_BF16 = {"D(256,1024)": (64, 1.0), "D(16384,1024)": (32, 1.35)}


def load(paths: list[Path]) -> dict[tuple[str, int, str], float]:
    """(scenario, conc, kv) -> output_tps(job)."""
    ours: dict[tuple[str, int, str], float] = {}
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                ours[(row["scenario"], int(row["conc"]), row["label"])] = float(row["output_tps_job"])
    return ours


def table(ours: dict[tuple[str, int, str], float]) -> str:
    lines = ["| scenario | conc | ours bf16 / int4 / int4-bdr | paper bf16 / int4 / int4-bdr | ours ÷ paper "
             "| bdr ÷ int4 | bdr ÷ bf16 |", "|---|---|---|---|---|---|---|"]
    for scenario, points in PAPER.items():
        first, factor = BDR_OVER_BF16[scenario]
        for conc, ref in points.items():
            got = [ours.get((scenario, conc, kv)) for kv in KVS]
            if all(g is None for g in got):
                continue
            ratios = " / ".join("–" if g is None else f"{g / r:.2f}" + ("" if g >= r else " ✗")
                                for g, r in zip(got, ref, strict=True))
            bf16, int4, bdr = got
            vs_int4 = "–" if bdr is None or int4 is None else f"{bdr / int4:.3f}" + (
                "" if bdr >= 0.98 * int4 else " ✗")
            need = factor if conc >= first else None
            vs_bf16 = "–" if bdr is None or bf16 is None else f"{bdr / bf16:.2f}" + (
                " ✗" if need is not None and bdr < need * bf16 else "")
            lines.append(f"| {scenario} | {conc} | " + " / ".join("–" if g is None else f"{g:,.0f}" for g in got)
                         + " | " + " / ".join(f"{r:,}" for r in ref) + f" | {ratios} | {vs_int4} | {vs_bf16} |")
    return "\n".join(lines)


def plot(ours: dict[tuple[str, int, str], float], scenario: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    concs = sorted(PAPER[scenario])
    for i, kv in enumerate(KVS):
        color = f"C{i}"
        ax.plot(concs, [PAPER[scenario][c][i] for c in concs], "--", color=color, alpha=0.6,
                label=f"paper (SGLang) {kv}")
        mine = [(c, ours[(scenario, c, kv)]) for c in concs if (scenario, c, kv) in ours]
        if mine:
            ax.plot(*zip(*mine, strict=True), "-o", color=color, label=f"saw {kv}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s (job)")
    ax.set_title(f"{scenario}, Qwen3-8B shapes, one H100")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", type=Path, help="summary.csv files written by saw-bench")
    p.add_argument("--out", type=Path, default=Path("bench/out/paper-comparison"))
    args = p.parse_args()
    ours = load(args.summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(ours)
    (args.out / "table.md").write_text(text + "\n")
    for scenario in PAPER:
        if any(k[0] == scenario for k in ours):
            plot(ours, scenario, args.out / f"{scenario.replace('(', '_').replace(')', '').replace(',', '_')}.png")
    print(text)


if __name__ == "__main__":
    main()
