"""One table and one plot of saw-bench runs of several engines at one or more points (bench/peer/race_gpu.sh).

Each run folder holds saw-bench's summary.json and the servers' logs (logs/*.log), from which the KV capacity
is read: vLLM's "GPU KV cache size: N tokens", saw's "KV pool: ..., N tokens", SGLang's "max_total_num_tokens=N".
Rows are labelled by saw-bench's labels: the peer's (vllm-<kv-cache-dtype>, sglang-<kv-cache-dtype>), saw's --kv
after the run's name (RUN_DIR:NAME, default "saw"); the ratio column compares each row with the fastest peer row
of its scenario and concurrency.

With --ceilings (roofline.py --measure, from the same hold) each row also gets its output tokens/s as a fraction
of the point's roofline bound (bench/peer/roofline.py) for --config's model.

  python bench/peer/table.py --out OUT_PREFIX [--ceilings C.json --config DIR] RUN_DIR[:NAME]...
      -> OUT_PREFIX.md, .json, .png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from roofline import Ceilings, Model, bound_tps, kv_bytes_per_token, scenario_lengths

CAPACITY = [re.compile(r"GPU KV cache size: ([\d,]+) tokens"), re.compile(r"KV pool: [^,]+, (\d+) tokens"),
            re.compile(r"max_total_num_tokens=(\d+)")]
PEERS = ("vllm", "sglang-")  # labels of the peer engines' rows


def capacities(run: Path) -> dict[str, int]:
    """KV tokens per label, from the run's logs (saw: logs/router_<kv>.log; a --url run: its one label)."""
    found: dict[str, int] = {}
    for log in sorted((run / "logs").glob("*.log")):
        text = log.read_text(errors="replace")
        for pattern in CAPACITY:
            m = pattern.search(text)
            if m:
                found[log.stem.removeprefix("router_")] = int(m.group(1).replace(",", ""))
                break
    return found


def rows(runs: list[str], roof: tuple[Model, Ceilings] | None = None) -> list[dict]:
    out = []
    for arg in runs:
        path, _, name = arg.partition(":")
        run = Path(path)
        summary = json.loads((run / "summary.json").read_text())
        caps = capacities(run)
        for p in summary["points"]:
            cap = caps.get(p["label"], next(iter(caps.values())) if len(caps) == 1 else None)
            engine = p["label"] if p["label"].startswith(PEERS) else f"{name or 'saw'} {p['label']}"
            out.append({"label": engine, "conc": p["conc"], "scenario": p["scenario"],
                        "output_tps_job": p["output_tps_job"], "mean_ttft_ms": p["mean_ttft_ms"],
                        "ok": p["requests_ok"], "failed": p["requests_failed"], "kv_tokens": cap,
                        "date": summary["meta"]["date"]})
    for point in {(r["scenario"], r["conc"]) for r in out}:
        here = [r for r in out if (r["scenario"], r["conc"]) == point]
        best_peer = max((r["output_tps_job"] for r in here if r["label"].startswith(PEERS)), default=None)
        for r in here:
            r["vs_best_peer"] = round(r["output_tps_job"] / best_peer, 3) if best_peer else None
            if roof:
                model, ceil = roof
                bound = bound_tps(model, ceil, *scenario_lengths(r["scenario"]), r["conc"],
                                  kv_bytes_per_token(r["label"], model), r["kv_tokens"])
                r["roofline_tps"], r["of_roofline"] = round(bound, 1), round(r["output_tps_job"] / bound, 3)
    return out


def _tokens(n: int | None) -> str:
    return f"{n:,}" if n else "?"


def _share(x: float | None) -> str:
    return f"{x:.0%}" if x else "–"


def _points(table: list[dict]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r["scenario"], r["conc"]) for r in table))


def markdown(table: list[dict]) -> str:
    head = "| engine / KV | KV tokens | output_tps(job) | vs best peer | of roofline | mean TTFT ms | ok / failed |\n"
    head += "|---|---:|---:|---:|---:|---:|---|\n"
    parts = []
    for scenario, conc in _points(table):
        lines = [f"| {r['label']} | {_tokens(r['kv_tokens'])} | {r['output_tps_job']:,.1f} | "
                 f"{r['vs_best_peer'] or '–'} | {_share(r.get('of_roofline'))} | {r['mean_ttft_ms']:,.0f} | "
                 f"{r['ok']} / {r['failed']} |"
                 for r in table if (r["scenario"], r["conc"]) == (scenario, conc)]
        parts.append(f"## {scenario}, concurrency {conc}\n\n" + head + "\n".join(lines) + "\n")
    return f"# Race ({table[0]['date']})\n\n" + "\n".join(parts)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(table)
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 3.8), squeeze=False)
    for ax, (scenario, conc) in zip(axes[0], points, strict=True):
        here = [r for r in table if (r["scenario"], r["conc"]) == (scenario, conc)]
        colors = ["#999999" if r["label"].startswith(PEERS) else "#2a7ab9" for r in here]
        ax.bar([r["label"].replace(" ", "\n", 1) for r in here], [r["output_tps_job"] for r in here], color=colors)
        ax.set_ylabel("output tokens/s (job)")
        ax.set_title(f"{scenario} c={conc}")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("peer engine (grey) and saw (blue), same GPU and prompts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="prefix of the .md, .json and .png written")
    ap.add_argument("--ceilings", type=Path, help="roofline.py --measure's JSON, from the same hold")
    ap.add_argument("--config", type=Path, default=Path("configs/qwen3-8b"), help="the model's config folder")
    ap.add_argument("runs", nargs="+", help="RUN_DIR[:NAME]")
    args = ap.parse_args()
    roof = None
    if args.ceilings:
        roof = Model.from_config(args.config), Ceilings(**json.loads(args.ceilings.read_text()))
    table = rows(args.runs, roof)
    text = markdown(table)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    plot(table, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
