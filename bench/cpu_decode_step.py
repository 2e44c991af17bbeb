"""Time of one decode step of the real worker engine on the CPU, by KV format and number of streams.

Builds the engine as the worker does (builder.build_engine: the alias's GGUF, calibration, the torch-reference
attention), prefills --streams requests of --prompt-tokens tokens, then times --steps decode steps driven by hand
(scheduler.schedule -> runner.run -> scheduler.on_ran), and prints ms per step and tokens/s. Where the time of a
step goes: --profile prints the top functions (cProfile) of the timed steps.

  python bench/cpu_decode_step.py --kv int4-bdr bf16 --streams 1 4 [--model smollm2-135m] [--out x.json]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saw_worker.builder import build_engine  # noqa: E402
from saw_worker.engine.request import GenerateParams, Sequence  # noqa: E402
from saw_worker.options import WorkerOptions  # noqa: E402


def step_ms(model: str, kv: str, streams: int, prompt_tokens: int, steps: int, profile: bool) -> float:
    opts = WorkerOptions()
    opts = dataclasses.replace(opts, model=dataclasses.replace(opts.model, name=model),
                               kv=dataclasses.replace(opts.kv, name=kv))
    engine = build_engine(opts)  # not started: the steps are driven here
    runner, scheduler = engine.runner, engine.scheduler
    for i in range(streams):
        ids = [100 + (i * 7 + p) % 1000 for p in range(prompt_tokens)]
        params = GenerateParams(f"r{i}", ids, max_new_tokens=steps + 16, ignore_eos=True)
        scheduler.add(Sequence(params, sink=lambda event: None, order=i))

    def step() -> bool:
        batch = scheduler.schedule()
        results = runner.run(batch)
        scheduler.on_ran(batch, [r.token for r in results])
        return batch.is_decode and len(batch.chunks) == streams

    while not step():  # the prefill chunks
        pass
    for _ in range(3):
        step()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t0) / steps * 1e3
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kv", nargs="+", default=["int4-bdr", "bf16"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for kv in args.kv:
        for n in args.streams:
            ms = step_ms(args.model, kv, n, args.prompt_tokens, args.steps, args.profile)
            rows.append({"model": args.model, "kv": kv, "streams": n, "context": args.prompt_tokens,
                         "ms_per_step": round(ms, 1), "tokens_per_s": round(n * 1e3 / ms, 1)})
            print(f"{args.model} {kv:9s} streams {n}: {ms:7.1f} ms/step, {n * 1e3 / ms:6.1f} tokens/s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
