"""Offline engine throughput, nano-vllm style: B requests of fixed input/output length (ignore_eos)
submitted at once to the engine (no server, no router), for each KV format.

    python bench/offline_throughput.py --model configs/qwen3-8b --load-format dummy \\
        --kv bf16 int4 int4-bdr --batch 8 16 32 64 128 256 --input-len 256 --output-len 512

Prints output tokens/s per (format, batch) and where a decode step's time goes: the engine's wall
time per step, the part inside the model runner (until sampled tokens reach the host), and on CUDA
the replay of that batch's decode graph alone (GPU time at the run's final context length); the
rest of a step is host work. Writes JSON + Markdown to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saw_worker.builder import build_engine  # noqa: E402
from saw_worker.engine.request import Event, GenerateParams  # noqa: E402
from saw_worker.options import (  # noqa: E402
    DecodeOptions,
    KVOptions,
    ModelOptions,
    PoolOptions,
    SchedulerOptions,
    WorkerOptions,
)


def run_batch(engine, batch: int, input_len: int, output_len: int, vocab: int, tag: str) -> float:  # noqa: ANN001
    """Wall seconds until all `batch` requests finish."""
    done = threading.Semaphore(0)

    def sink(ev: Event) -> None:
        if ev.finish is not None:
            done.release()

    g = torch.Generator().manual_seed(batch)
    started = time.perf_counter()
    for i in range(batch):
        ids = torch.randint(100, vocab - 100, (input_len,), generator=g).tolist()
        engine.submit(GenerateParams(f"{tag}-{i}", ids, max_new_tokens=output_len, ignore_eos=True), sink)
    for _ in range(batch):
        done.acquire()
    return time.perf_counter() - started


def graph_ms(engine, batch: int) -> float | None:  # noqa: ANN001
    """GPU milliseconds of one replay of the decode graph that serves `batch` rows, as last filled."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    graph = graphs._graphs[next(s for s in graphs.sizes if s >= batch)]  # noqa: SLF001 (a benchmark probe)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/qwen3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--kv", nargs="+", default=["bf16", "int4", "int4-bdr"])
    p.add_argument("--batch", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--hadamard-order", type=int, default=128)
    p.add_argument("--k-center", action=argparse.BooleanOptionalAction, default=False,
                   help="K centering for the INT4 formats (off by default here, as in the paper's runs)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=DecodeOptions.overlap,
                   help="launch decode step N+1 before step N's tokens reach the host (worker flag --overlap)")
    p.add_argument("--kv-cache-memory", default=None, help="fixed pool size (e.g. 20GiB); default: --mem-fraction")
    p.add_argument("--mem-fraction", type=float, default=PoolOptions.mem_fraction)
    p.add_argument("--out", default="bench/out")
    args = p.parse_args()

    from saw_worker.flags import parse_bytes

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    for kv in args.kv:
        memory = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None
        opts = WorkerOptions(model=ModelOptions(name=args.model, load_format=args.load_format),
                             kv=KVOptions(name=kv, hadamard_order=args.hadamard_order,
                                          k_center=args.k_center and kv != "bf16"),
                             pool=PoolOptions(mem_fraction=args.mem_fraction, kv_cache_memory=memory),
                             scheduler=SchedulerOptions(max_running_requests=max(args.batch)),
                             decode=DecodeOptions(overlap=args.overlap))
        t0 = time.perf_counter()
        engine = build_engine(opts)
        engine.start()
        info = engine.info()
        print(f"[{kv}] ready in {time.perf_counter() - t0:.1f}s, KV capacity {info.kv_capacity_tokens} tokens",
              flush=True)
        run_batch(engine, min(args.batch), 32, 8, info.vocab_size, f"{kv}-warm")  # discarded warm-up
        for b in args.batch:
            before = engine.step_totals()
            wall = run_batch(engine, b, args.input_len, args.output_len, info.vocab_size, f"{kv}-{b}")
            steps = engine.step_totals().minus(before)
            tps = b * args.output_len / wall
            n = max(steps.decode_steps, 1)
            step_ms, forward_ms, gpu_ms = 1e3 * steps.decode_s / n, 1e3 * steps.forward_s / n, graph_ms(engine, b)
            rows.append({"kv": kv, "batch": b, "input_len": args.input_len, "output_len": args.output_len,
                         "wall_s": round(wall, 3), "output_tps": round(tps, 1), "decode_step_ms": round(step_ms, 3),
                         "forward_ms": round(forward_ms, 3), "graph_gpu_ms": gpu_ms and round(gpu_ms, 3),
                         "kv_capacity_tokens": info.kv_capacity_tokens, "device": device})
            gpu = f", last-step graph {gpu_ms:.2f} ms GPU" if gpu_ms else ""
            print(f"[{kv}] batch {b:4d}: {wall:7.2f}s  {tps:9.1f} output tok/s | decode step {step_ms:.2f} ms, "
                  f"runner {forward_ms:.2f} ms{gpu}", flush=True)
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    meta = {"device": device, "date": stamp, "command": " ".join(sys.argv), "rows": rows}
    (out / f"offline-{stamp}.json").write_text(json.dumps(meta, indent=1))
    by = {(r["kv"], r["batch"]): r["output_tps"] for r in rows}
    lines = [f"Offline engine throughput, output tok/s ({device}, {stamp}; in={args.input_len}, "
             f"out={args.output_len}, model {args.model} {args.load_format})", "",
             "| batch | " + " | ".join(args.kv) + " |", "|---|" + "---|" * len(args.kv)]
    for b in args.batch:
        lines.append(f"| {b} | " + " | ".join(f"{by[(kv, b)]:.0f}" for kv in args.kv) + " |")
    (out / f"offline-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
