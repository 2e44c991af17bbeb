"""In-process accuracy sweep over KV formats and options (exact full-vocabulary KL, no server).

    PYTHONPATH=python python bench/accuracy/sweep.py --model smollm2-135m --windows 8 --window 1024 \\
        --out bench/results/accuracy-smollm2-135m.json
    PYTHONPATH=python python bench/accuracy/sweep.py --suite levers --model smollm2-135m \\
        --out bench/results/accuracy-sim-2026-12-02/smollm2-135m.json   # K scale / window / sinks / FP8 / INT8

For each corpus window (saw_eval.corpus) the bf16-cache run is the reference; every config reports
perplexity, mean KL(bf16 || config) over all positions and top-1 agreement. Also: the per-layer K
outlier statistic (max channel magnitude / median channel magnitude) and, with --greedy, a greedy
answer to a chat prompt under each config. See sim.py for how formats are simulated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(Path(__file__).resolve().parent)]

import tokenizers  # noqa: E402
from sim import Calibration, SimAttention, SimFormat, k_scale_lambda  # noqa: E402

from saw_eval.corpus import corpus_meta, load_corpus, windows  # noqa: E402
from saw_worker.kv.calibration import CALIBRATION_TEXT  # noqa: E402
from saw_worker.loader import load_model  # noqa: E402

GREEDY_PROMPT = "What is the capital of France?"


def configs(head_dim: int) -> dict[str, SimFormat]:
    c: dict[str, SimFormat] = {"bf16": SimFormat("bf16")}
    for kc in (False, True):
        sfx = " +kc" if kc else ""
        c["int4" + sfx] = SimFormat("int4", k_center=kc)
        for order in (16, 32, 64):
            c[f"int4-bdr{order}{sfx}"] = SimFormat("int4-bdr", order, k_center=kc)
        c[f"int4-bdr{head_dim} --rotate-v{sfx}"] = SimFormat("int4-bdr", head_dim, rotate_v=True, k_center=kc)
    best = SimFormat("int4-bdr", head_dim, k_center=True)
    c["bdr+kc, bf16 scales"] = replace(best, param_dtype=torch.bfloat16)
    c["bdr+kc, sink 4 bf16"] = replace(best, sink=4)
    c["int4+kc, sink 4 bf16"] = SimFormat("int4", k_center=True, sink=4)
    c["bdr+kc, V centered"] = replace(best, v_center=True)
    c["bdr+kc, K groups of 32"] = replace(best, k_group=32)
    c["bdr+kc, K int8"] = replace(best, k_bits=8)
    c["bdr+kc, layers 0-1 bf16"] = replace(best, exact_layers=frozenset({0, 1}))
    # Second round (qwen): combinations on the best order-32 config; run with --only.
    b32 = SimFormat("int4-bdr", min(32, head_dim), k_center=True)
    c["bdr32+kc, K groups of 32"] = replace(b32, k_group=32)
    c["bdr32+kc, layers 0-1 K bf16"] = replace(b32, exact_k_layers=frozenset({0, 1}))
    c["bdr32+kc, K groups of 32, sink 4"] = replace(b32, k_group=32, sink=4)
    c["bdr32+kc, K groups of 32, layers 0-1 K bf16"] = replace(b32, k_group=32, exact_k_layers=frozenset({0, 1}))
    return c


def lever_configs(head_dim: int) -> dict[str, SimFormat]:
    """K scale (alpha, pow2), bf16 window W and sinks S on today's default, and the FP8 / INT8 comparisons."""
    base = SimFormat("int4-bdr", 128 if head_dim >= 128 else min(32, head_dim), k_center=True)
    sc = replace(base, k_scale_alpha=0.5)
    c: dict[str, SimFormat] = {
        "bf16": SimFormat("bf16"),
        "default (bdr32+kc)": base,
        "+scale a0.5": sc,
        "+scale a0.5 exact": replace(sc, k_scale_pow2=False),
        "+scale a0.5 W8": replace(sc, window=8),
        "+scale a0.5 W16": replace(sc, window=16),
        "+scale a0.5 W32": replace(sc, window=32),
        "+scale a0.5 W64": replace(sc, window=64),
        "+scale a0.5 S4": replace(sc, sink=4),
        "+scale a0.5 S4 W16": replace(sc, sink=4, window=16),
        "+scale a0.5 S4 W32": replace(sc, sink=4, window=32),
        "W32 (no scale)": replace(base, window=32),
        "+scale a0.3": replace(base, k_scale_alpha=0.3),
        "+scale a0.7": replace(base, k_scale_alpha=0.7),
        "+scale a0.3 W32": replace(base, k_scale_alpha=0.3, window=32),
        "+scale a0.7 W32": replace(base, k_scale_alpha=0.7, window=32),
        "+scale a0.5 W32, INT4 logits not shifted by q.mu": replace(sc, window=32, window_unshifted=True),
        # Noise replicates: INT4 rounding (and fp16 rounding of scale/lo) makes the simulation chaotic,
        # a 1e-7 relative change of q moves one window's ppl by ~1 %; these rows show the spread.
        "default, replicate q*(1+1e-7)": replace(base, q_perturb=1e-7),
        "+scale a0.5, replicate q*(1+1e-7)": replace(sc, q_perturb=1e-7),
        "+scale a0.5 W32, replicate q*(1+1e-7)": replace(sc, window=32, q_perturb=1e-7),
        "fp8 e4m3 (scale per layer)": SimFormat("fp8"),
        "int8 (per token-head)": SimFormat("int8"),
        "int8 +kc (K centered)": SimFormat("int8", k_center=True),
    }
    return c


def outlier_stats(k: torch.Tensor) -> float:
    """max over heads of max_c(max_t |k|) / median_c(max_t |k|) for K [T, Hkv, D]."""
    mag = k.abs().amax(0)  # [Hkv, D]
    return float((mag.amax(-1) / mag.median(-1).values.clamp(min=1e-6)).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--only", nargs="*", help="config names to run (default: all)")
    p.add_argument("--suite", choices=("formats", "levers"), default="formats",
                   help="formats: the 2026-11 format sweep; levers: K scale, window, sinks, FP8, INT8")
    p.add_argument("--greedy", action="store_true", help="also answer a chat prompt greedily under each config")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)

    att = SimAttention(SimFormat("bf16"), 1.0)
    loaded = load_model(args.model, "auto", torch.device("cpu"), torch.float32, att)
    model, cfg = loaded.model, loaded.config
    att.sm_scale = cfg.head_dim ** -0.5
    tok = tokenizers.Tokenizer.from_str(loaded.tokenizer.tokenizer_json)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731

    @torch.inference_mode()
    def logprobs(ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids)
        return torch.log_softmax(model.compute_logits(model(t, torch.arange(len(ids)))), -1)

    # K/V means for centering, K scale and FP8 statistics, from the calibration text under a bf16 cache.
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    att.qkv_observer = lambda i, q, k, v: seen.__setitem__(i, (q.clone(), k.clone(), v.clone()))
    calib_ids = encode(CALIBRATION_TEXT)
    logprobs(calib_ids)
    att.qkv_observer = None
    att.calib = Calibration.from_observed(seen)
    seen.clear()
    k_mean, v_mean = att.calib.k_mean, att.calib.v_mean
    lam = k_scale_lambda(att.calib.k_absmax, att.calib.q_absmax, 0.5, True)  # for the statistics only

    files = load_corpus()
    wins = windows(files, encode, args.window, args.windows)
    table = configs(cfg.head_dim) if args.suite == "formats" else lever_configs(cfg.head_dim)
    extra = {n for n in table if n.startswith("bdr32+kc")}  # second round: only when asked for
    unknown = set(args.only or ()) - set(table)
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; choose from {list(table)}")
    names = [n for n in table if (n in args.only if args.only else n not in extra) or n == "bf16"]
    acc = {n: {"nll": 0.0, "kl": 0.0, "top1": 0, "n": 0, "s": 0.0, "per_window": []} for n in names}
    stats: dict[int, dict[str, float]] = {}
    started = time.perf_counter()
    for w, ids in enumerate(wins):
        att.fmt, att.k_mean, att.v_mean = table["bf16"], k_mean, v_mean
        if w == 0:
            def observe(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
                stats[i] = {"k_raw": outlier_stats(k), "k_centered": outlier_stats(k - k_mean[i]),
                            "k_scaled_a0.5": outlier_stats((k - k_mean[i]) / lam[i]),
                            "log2_lambda_a0.5_min_max": [float(lam[i].log2().min()), float(lam[i].log2().max())],
                            "v": outlier_stats(v), "k_mean_norm_over_rms": float(
                                (k_mean[i].norm(dim=-1) / (k - k_mean[i]).pow(2).sum(-1).mean(0).sqrt()).max())}
            att.observer = observe
        else:
            att.observer = None
        ref = logprobs(ids)
        att.observer = None
        tgt = torch.tensor(ids[1:])
        for n in names:
            att.fmt = table[n]
            t0 = time.perf_counter()
            lp = ref if n == "bf16" else logprobs(ids)
            a = acc[n]
            a["s"] += time.perf_counter() - t0
            nll = -float(lp[:-1].gather(1, tgt[:, None]).sum())
            kl = float((ref.exp() * (ref - lp)).sum(-1)[:-1].sum())
            top1 = int((lp[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
            a["nll"], a["kl"], a["top1"], a["n"] = a["nll"] + nll, a["kl"] + kl, a["top1"] + top1, a["n"] + len(ids) - 1
            m = len(ids) - 1
            a["per_window"].append({"ppl": round(float(torch.tensor(nll / m).exp()), 4),
                                    "mean_kl": round(kl / m, 5), "top1_agree": round(top1 / m, 4)})
        print(f"window {w + 1}/{len(wins)} done, {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        save(args, loaded, cfg, files, table, names, acc, stats, {}, w + 1, started, quiet=False,
             calib_tokens=len(calib_ids))

    greedy: dict[str, str] = {}
    if args.greedy:
        greedy = run_greedy(loaded, tok, encode, att, table, names, logprobs)
    save(args, loaded, cfg, files, table, names, acc, stats, greedy, len(wins), started, quiet=False,
         calib_tokens=len(calib_ids))


def run_greedy(loaded, tok, encode, att, table, names, logprobs) -> dict[str, str]:  # noqa: ANN001
    import jinja2

    tmpl = jinja2.Environment().from_string(loaded.tokenizer.chat_template)
    text = tmpl.render(messages=[{"role": "user", "content": GREEDY_PROMPT}], add_generation_prompt=True,
                       bos_token=loaded.tokenizer.bos_token, eos_token=loaded.tokenizer.eos_token)
    prompt = encode(text)
    eos = set(loaded.tokenizer.eos_token_ids)
    greedy = {}
    for n in names:
        att.fmt = table[n]
        ids = list(prompt)
        for _ in range(24):  # full recompute per step: every token re-reads the quantized cache
            nxt = int(logprobs(ids)[-1].argmax())
            if nxt in eos:
                break
            ids.append(nxt)
        greedy[n] = tok.decode(ids[len(prompt):])
        print(f"{n:32s} -> {greedy[n]!r}", flush=True)
    return greedy


def save(args, loaded, cfg, files, table, names, acc, stats, greedy, n_windows, started, quiet,  # noqa: ANN001
         calib_tokens: int = 0) -> None:
    rows = []
    for n in names:
        a, f = acc[n], table[n]
        rows.append({"config": n, "ppl": round(float(torch.tensor(a["nll"] / a["n"]).exp()), 4),
                     "mean_kl": round(a["kl"] / a["n"], 5), "top1_agree": round(a["top1"] / a["n"], 4),
                     "tokens": a["n"], "bytes_per_token_head": f.bytes_per_token_head(cfg.head_dim, cfg.num_layers),
                     "bf16_bytes_per_request_head_layer": f.window_bytes_per_head(cfg.head_dim),
                     "seconds": round(a["s"], 1), "per_window": a["per_window"],
                     "format": {k: (str(v) if not isinstance(v, (int, bool, str)) else v)
                                for k, v in asdict(f).items()}})
        if not quiet:
            print(f"{n:32s} ppl {rows[-1]['ppl']:8.3f}  KL {rows[-1]['mean_kl']:.5f}  "
                  f"top1 {rows[-1]['top1_agree']:.4f}", flush=True)

    out = {"model": args.model, "model_id": loaded.model_id, "head_dim": cfg.head_dim, "window": args.window,
           "windows": n_windows, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
           "num_heads": cfg.num_heads, "calibration_tokens": calib_tokens, "corpus": corpus_meta(files),
           "method": "in-process simulation, exact KL",
           "command": " ".join(sys.argv), "rows": rows, "k_outliers_per_layer": stats,
           "greedy_prompt": GREEDY_PROMPT if args.greedy else None, "greedy": greedy,
           "seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
