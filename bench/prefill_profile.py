"""Where a long prompt's prefill goes on the GPU (issue 18's TTFT gap): time of one prompt's prefill through the
real engine, its model FLOP rate against the bf16 matmul ceiling measured in the same run, and the top CUDA
kernels of one prefill (torch.profiler), per KV format.

Builds the engine as the worker does (builder.build_engine; dummy weights of --model), submits one prompt of
--prompt-tokens tokens, drives the prefill chunks by hand (scheduler.schedule -> runner.run -> scheduler.on_ran)
and times them with a device synchronize at each end.

  python bench/prefill_profile.py --model configs/qwen3-8b --kv bf16 int4-bdr --prompt-tokens 16384 [--out x.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saw_worker.builder import build_engine  # noqa: E402
from saw_worker.config import ModelConfig  # noqa: E402
from saw_worker.engine.request import GenerateParams, Sequence  # noqa: E402
from saw_worker.options import WorkerOptions  # noqa: E402


def matmul_tflops(n: int = 8192) -> float:
    """The bf16 matmul ceiling of this device: the median of 20 [n, n] @ [n, n] products."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * n**3 / (sorted(times[5:])[10] * 1e-3) / 1e12


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    """Model FLOPs of one causal prefill: 2 x parameters x tokens for the projections (LM head for the last token
    only, as the engine computes it) plus the attention products (4 T^2 D H / 2, causal)."""
    attention = 4 * tokens * tokens * cfg.head_dim * cfg.num_heads / 2
    return cfg.num_layers * (2 * cfg.projection_params() * tokens + attention) + 2 * cfg.hidden_size * cfg.vocab_size


def prefill_once(engine: object, tokens: int, rid: str, profile: bool) -> tuple[float, str]:
    runner, scheduler = engine.runner, engine.scheduler  # type: ignore[attr-defined]
    first = 100 + 997 * sum(map(ord, rid)) % 140_000  # a prompt of its own per call: no prefix-cache hit
    ids = [first + (p * 7) % 5000 for p in range(tokens)]
    scheduler.add(Sequence(GenerateParams(rid, ids, max_new_tokens=1, ignore_eos=True), sink=lambda e: None,
                           order=0))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if prof:
        prof.start()
    while True:
        batch = scheduler.schedule()
        if batch is None or batch.is_decode:
            break
        results = runner.run(batch)
        scheduler.on_ran(batch, [r.token for r in results])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    table = ""
    if prof:
        prof.stop()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    return seconds, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="configs/qwen3-8b")
    ap.add_argument("--kv", nargs="+", default=["bf16", "int4-bdr"])
    ap.add_argument("--prompt-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ceiling = matmul_tflops()
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)
    rows = []
    for kv in args.kv:
        opts = WorkerOptions()
        opts = dataclasses.replace(opts, model=dataclasses.replace(opts.model, name=args.model, load_format="dummy"),
                                   kv=dataclasses.replace(opts.kv, name=kv))
        engine = build_engine(opts)
        cfg = engine.runner.model.config
        prefill_once(engine, 1024, "warm", False)
        times = [prefill_once(engine, args.prompt_tokens, f"p{r}", False)[0] for r in range(args.repeats)]
        seconds = sorted(times)[len(times) // 2]
        _, table = prefill_once(engine, args.prompt_tokens, "profiled", True)
        tflops = prefill_flops(cfg, args.prompt_tokens) / seconds / 1e12
        row = {"kv": kv, "prompt_tokens": args.prompt_tokens, "seconds": round(seconds, 3),
               "tokens_per_s": round(args.prompt_tokens / seconds), "model_tflops": round(tflops, 1),
               "fraction_of_matmul_ceiling": round(tflops / ceiling, 3)}
        rows.append(row)
        print(f"{kv:9s} prefill {args.prompt_tokens} tokens: {seconds:.3f} s, {row['tokens_per_s']} tok/s, "
              f"{tflops:.0f} TFLOP/s = {100 * tflops / ceiling:.0f} % of the matmul ceiling", flush=True)
        print(table, flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "matmul_tflops": round(ceiling),
                                        "model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
