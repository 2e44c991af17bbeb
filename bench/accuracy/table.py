"""Markdown tables for docs/accuracy.md from the sweep JSON files.

    python bench/accuracy/table.py bench/results/accuracy-smollm2-135m-sweep.json
    python bench/accuracy/table.py --levers A.json B.json   # one table, the models side by side
"""

from __future__ import annotations

import json
import sys


def render(path: str) -> str:
    r = json.loads(open(path).read())
    bf16 = next(x for x in r["rows"] if x["config"] == "bf16")
    d = r["head_dim"]
    out = [f"**{r['model']}** ({r['windows']} windows x {r['window']} tokens = {bf16['tokens']} scored tokens; "
           f"exact full-vocabulary KL; `{r['command']}`)", "",
           "| config | bytes / token-head (K+V) | ppl | Δppl vs bf16 | mean KL | top-1 agree | greedy answer |",
           "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        g = (r.get("greedy") or {}).get(x["config"], "")
        g = g.replace("|", "\\|").replace("\n", " ")[:48]
        out.append(f"| {x['config']} | {x['bytes_per_token_head']:.1f} | {x['ppl']:.3f} | "
                   f"{100 * (x['ppl'] / bf16['ppl'] - 1):+.1f}% | {x['mean_kl']:.4f} | {x['top1_agree']:.3f} | {g} |")
    out += ["", f"K outlier statistic per layer (max over KV heads of max-channel |k| / median-channel |k|, "
            f"first window; D={d}):", "",
            "| layer | raw K | centered K | V | ‖μ_K‖ / rms(K−μ) |", "|---|---|---|---|---|"]
    for layer, s in sorted(r["k_outliers_per_layer"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {layer} | {s['k_raw']:.1f} | {s['k_centered']:.1f} | {s['v']:.1f} | "
                   f"{s['k_mean_norm_over_rms']:.2f} |")
    return "\n".join(out)


def render_levers(paths: list[str]) -> str:
    """Configs as rows, per model ppl (Δ vs bf16) / mean KL / top-1 agreement; configs a model lacks: —."""
    runs: list[dict] = []
    for path in paths:  # files of one model (same windows) are merged, the first one's rows first
        r = json.loads(open(path).read())
        same = next((x for x in runs if x["model"] == r["model"]), None)
        if same is None:
            runs.append(r)
            continue
        assert (same["windows"], same["window"]) == (r["windows"], r["window"]), path
        same["rows"] += [x for x in r["rows"] if x["config"] not in {y["config"] for y in same["rows"]}]
        same["seconds"] += r["seconds"]
    names: list[str] = []
    for r in runs:
        names += [x["config"] for x in r["rows"] if x["config"] not in names]
    d = runs[0]["head_dim"]
    head = f"| config | bytes / token-head (K+V, D={d}) | bf16 bytes / request / KV head / layer (D={d}) |"
    sep = "|---|---|---|"
    for r in runs:
        head += f" {r['model']} ppl (Δ) | KL | top-1 |"
        sep += "---|---|---|"
    out = [head, sep]
    for n in names:
        row = None
        cells = ""
        for r in runs:
            bf = next(x for x in r["rows"] if x["config"] == "bf16")
            x = next((x for x in r["rows"] if x["config"] == n), None)
            if x is None:
                cells += " — | — | — |"
                continue
            row = row or x
            cells += (f" {x['ppl']:.3f} ({100 * (x['ppl'] / bf['ppl'] - 1):+.2f} %) | {x['mean_kl']:.4f} |"
                      f" {x['top1_agree']:.3f} |")
        out.append(f"| {n} | {row['bytes_per_token_head']:g} | {row.get('bf16_bytes_per_request_head_layer', 0)} |"
                   + cells)
    out += ["", "; ".join(f"{r['model']}: {r['windows']} windows x {r['window']} tokens = "
                          f"{next(x for x in r['rows'] if x['config'] == 'bf16')['tokens']} scored tokens, "
                          f"{r['seconds']:.0f} s" for r in runs)]
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--levers"]:
        print(render_levers(sys.argv[2:]))
    else:
        print("\n\n".join(render(p) for p in sys.argv[1:]))
