"""Markdown tables for docs/accuracy.md from the sweep JSON files.

    python bench/accuracy/table.py bench/results/accuracy-smollm2-135m-sweep.json
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


if __name__ == "__main__":
    print("\n\n".join(render(p) for p in sys.argv[1:]))
