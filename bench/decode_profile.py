"""Where the GPU time of one eager decode step goes (Qwen3-8B shapes, dummy weights).

    PYTHONPATH=python python3 bench/decode_profile.py --kv bf16 int4-bdr --batch 64 256 --context 1024

For each KV format an engine is built as bench/offline_throughput.py does (but without CUDA graphs
and without starting its thread); for each batch size B requests of --context random tokens are
prefilled and decoded a few steps by hand (scheduler.schedule -> runner.run -> scheduler.on_ran),
then --steps decode steps run under torch.profiler. Printed per (format, batch):

- CUDA kernel time per step by category (GEMM, attention, KV write, norm, rope, activation, ...),
  from the kernel name and the model scope that launched it (rope / norm / attention / logits are
  wrapped in profiler labels for the profiled steps only, so e.g. a `mul` is told apart as rope or
  SiLU-and-mul);
- the top 15 kernels by time, with calls per step;
- kernel time per step against the synchronised wall time of an unprofiled eager step (eager pays
  the CPU launch cost; the kernel sum is roughly what a CUDA-graph replay costs on the GPU).

Then two references: the model's own linear layers (qkv, o, gate_up, down x layers, lm_head) run
as bare torch.matmul at M = B (in a CUDA graph, so launch gaps do not count), with the weight
bytes/s they reach, and a device-to-device copy bandwidth. Rows go to --out as JSON.

On a machine without CUDA it runs a shrunken config (--tiny, the default there) in float32 and
profiles CPU ops instead of kernels: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saw_worker.builder import build_engine  # noqa: E402
from saw_worker.engine.engine import LocalEngine  # noqa: E402
from saw_worker.engine.request import GenerateParams, Sequence  # noqa: E402
from saw_worker.models import decoder as decoder_module  # noqa: E402
from saw_worker.options import (  # noqa: E402
    DecodeOptions,
    KVOptions,
    ModelOptions,
    PoolOptions,
    SchedulerOptions,
    WorkerOptions,
)

LABEL = "bench:"  # prefix of the profiler labels this script wraps model scopes in
CATEGORIES = ("gemm", "lm_head gemm", "attention", "kv write", "norm", "rope", "activation", "residual add",
              "logits+sample", "copy/other")
TINY = {"num_hidden_layers": 2, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 4096, "max_position_embeddings": 4096}


# --- engine set-up and hand-driven steps -----------------------------------------------------------

def tiny_model_dir(model: str, tmp: Path) -> str:
    """A copy of model's config.json shrunk to TINY (the CPU smoke test: 8B in float32 is 33 GB)."""
    src = Path(model)
    cfg = json.loads((src / "config.json" if src.is_dir() else src).read_text())
    cfg.update(TINY)
    dst = tmp / f"{src.name}-tiny"
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_step(engine: LocalEngine, batch: int) -> None:
    """One decode step for every running request, as the engine loop does it (minus events)."""
    sched = engine.scheduler
    b = sched.schedule()
    assert b is not None and b.is_decode and len(b.chunks) == batch, "expected a full decode batch"
    finishes = sched.on_ran(b, [r.token for r in engine.runner.run(b)])
    assert not any(finishes), "a request finished early"


def fill(engine: LocalEngine, batch: int, context: int, warm_steps: int, tag: str) -> tuple[list[Sequence], float]:
    """Admit `batch` requests of `context` random tokens, prefill them all and decode warm_steps.
    Returns the sequences and the prefill seconds."""
    info, sched, runner = engine.info(), engine.scheduler, engine.runner
    g = torch.Generator().manual_seed(batch)
    seqs = []
    for i in range(batch):
        ids = torch.randint(300, info.vocab_size - 1, (context,), generator=g).tolist()
        params = GenerateParams(f"{tag}-{i}", ids, max_new_tokens=1 << 20, ignore_eos=True)
        params.validate(info.vocab_size, info.context_length, info.kv_capacity_tokens)
        seq = Sequence(params, sink=lambda ev: None, order=i + 1)
        sched.add(seq)
        seqs.append(seq)
    started = time.perf_counter()
    while sched.waiting:  # prefill has priority, so every step here is a prefill chunk batch
        b = sched.schedule()
        assert b is not None and not b.is_decode, "prefill could not be scheduled (KV pool too small?)"
        sched.on_ran(b, [r.token for r in runner.run(b)])
    sync(runner.device)
    prefill_s = time.perf_counter() - started
    assert len(sched.running) == batch
    for _ in range(warm_steps):
        decode_step(engine, batch)
    return seqs, prefill_s


def release(engine: LocalEngine, seqs: list[Sequence]) -> None:
    for s in seqs:
        engine.scheduler.on_abort(s.id)


# --- profiler labels around model scopes (profiled steps only) ----------------------------------------

def labelled(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(LABEL + name):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def scope_labels(engine: LocalEngine) -> Iterator[None]:
    """Wrap rope, the RMSNorms, attention, logits and sampling in profiler labels; undo on exit."""
    model = engine.runner.model
    norms = []
    for name, m in model.named_modules():
        if isinstance(m, decoder_module.RMSNorm):
            m.forward = labelled(m.forward, "qk_norm" if name.endswith(("q_norm", "k_norm")) else "norm")
            norms.append(m)
    runner = engine.runner
    saved = (decoder_module.apply_rope, model.attention, runner.sampler)
    decoder_module.apply_rope = labelled(decoder_module.apply_rope, "rope")
    model.attention = labelled(model.attention, "attention")
    model.compute_logits = labelled(model.compute_logits, "logits")
    runner.sampler = labelled(runner.sampler, "sample")
    try:
        yield
    finally:
        decoder_module.apply_rope, model.attention, runner.sampler = saved
        del model.compute_logits
        for m in norms:
            del m.forward


# --- profile analysis -----------------------------------------------------------------------------

GEMM_MARKS = ("gemm", "gemv", "nvjet", "cutlass", "cublas", "xmma", "sm90_", "sm80_", "ampere_", "aten::mm",
              "aten::addmm", "aten::bmm")


def category(name: str, scope: str) -> str:
    n = name.lower()
    if scope == "attention" and not ("write" in n or "quant" in n):
        return "attention"
    if any(m in n for m in GEMM_MARKS):
        return "lm_head gemm" if scope == "logits" else "gemm"
    if scope in ("logits", "sample") or "argmax" in n:
        return "logits+sample"
    if "write" in n or "quant" in n or "hadamard" in n:
        return "kv write"
    if scope == "attention" or any(m in n for m in ("_decode_kernel", "_reduce_kernel", "_extend", "attention")):
        return "attention"
    if scope in ("norm", "qk_norm") or "rms" in n or "norm" in n:
        return "norm"
    if scope == "rope" or "flip" in n or "addcmul" in n:
        return "rope"
    if "silu" in n or "mul" in n:
        return "activation"
    if "add" in n:
        return "residual add"
    return "copy/other"


def short_name(name: str, width: int = 78) -> str:
    for junk in ("void ", "at::native::", "(anonymous namespace)::", "c10::", "at::", "std::"):
        name = name.replace(junk, "")
    return name if len(name) <= width else name[: width - 1] + "~"


@dataclass
class Item:
    name: str
    us: float
    scope: str


def scope_of(ev: Any) -> str:
    """The innermost bench label above a CPU op ('' when none)."""
    while ev is not None:
        if ev.name.startswith(LABEL):
            return ev.name[len(LABEL):]
        ev = ev.cpu_parent
    return ""


def work_items(prof: profile, on_gpu: bool) -> tuple[list[Item], float]:
    """Kernels (GPU; memcpy/memset too) or CPU ops' self time (CPU), each with its model scope, and the
    fraction of the time whose launching op was found (the rest is counted by kernel name alone)."""
    from torch.autograd import DeviceType

    events = prof.events()
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    if not on_gpu:
        items = [Item(e.name, e.self_cpu_time_total, scope_of(e)) for e in cpu_ops
                 if not e.name.startswith(LABEL) and e.self_cpu_time_total > 0]
        return items, 1.0
    # The profiler hangs each kernel on the op that launched it (op.kernels); kernels it could not link
    # are what the device timeline holds beyond that, per kernel name.
    items = [Item(k.name, k.duration, scope_of(e)) for e in cpu_ops for k in e.kernels]
    linked: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for it in items:
        linked[it.name][0] += it.us
        linked[it.name][1] += 1
    device: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.device_type == DeviceType.CUDA and not e.name.startswith(LABEL) \
                and not getattr(e, "is_user_annotation", False):
            device[e.name][0] += e.time_range.elapsed_us()
            device[e.name][1] += 1
    linked_us = sum(it.us for it in items)
    for name, (us, n) in device.items():
        rest_us, rest_n = us - linked[name][0], int(n - linked[name][1])
        if rest_n > 0 and rest_us > 0:
            items += [Item(name, rest_us / rest_n, "")] * rest_n
    total = sum(it.us for it in items)
    return items, linked_us / total if total else 1.0


@dataclass
class StepProfile:
    kernel_ms: float
    by_category: dict[str, float]
    top: list[dict[str, Any]] = field(default_factory=list)
    scoped: float = 1.0  # fraction of kernel time whose launching op (and so model scope) was known


def summarize(items: list[Item], steps: int, top_n: int = 15) -> StepProfile:
    by_cat: dict[str, float] = defaultdict(float)
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for it in items:
        cat = category(it.name, it.scope)
        by_cat[cat] += it.us
        k = by_kernel[(it.name, cat)]
        k[0] += it.us
        k[1] += 1
    total = sum(by_cat.values())
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top_n]
    return StepProfile(
        kernel_ms=total / steps / 1e3,
        by_category={c: by_cat.get(c, 0.0) / steps / 1e3 for c in CATEGORIES},
        top=[{"kernel": short_name(name), "category": cat, "ms_per_step": us / steps / 1e3,
              "calls_per_step": n / steps, "us_per_call": us / n} for (name, cat), (us, n) in top],
    )


def profile_steps(engine: LocalEngine, batch: int, steps: int) -> StepProfile:
    device = engine.runner.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with scope_labels(engine):
        decode_step(engine, batch)  # the wrappers' first call outside the profile
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                decode_step(engine, batch)
            sync(device)
    items, scoped = work_items(prof, device.type == "cuda")
    result = summarize(items, steps)
    result.scoped = scoped
    return result


def wall_ms(engine: LocalEngine, batch: int, steps: int) -> float:
    """Median synchronised wall time of an unprofiled eager decode step."""
    device = engine.runner.device
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        decode_step(engine, batch)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# --- references: bare matmuls and a copy -----------------------------------------------------------

def timed_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Mean milliseconds of fn(); on CUDA fn is captured once in a CUDA graph and replayed."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up on a side stream before capture (cuBLAS workspaces, heuristics)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / reps
    del graph
    return ms


@torch.inference_mode()
def gemm_rows(model: torch.nn.Module, batch: int, reps: int) -> list[dict[str, Any]]:
    """The model's linear layers as bare x @ W.T with M = batch: ms, weight bytes/s, TFLOP/s per kind."""
    layers = list(model.layers)
    lm_head = model.lm_head_weight if model.lm_head_weight is not None else model.embed_weight
    kinds: dict[str, list[torch.Tensor]] = {
        "qkv": [ly.qkv_weight for ly in layers], "o": [ly.o_weight for ly in layers],
        "gate_up": [ly.gate_up_weight for ly in layers], "down": [ly.down_weight for ly in layers],
        "lm_head": [lm_head],
    }
    w0 = lm_head
    xs = {k: torch.randn(batch, ws[0].shape[1], device=w0.device, dtype=w0.dtype) for k, ws in kinds.items()}

    def run(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def fn() -> None:
            for x, w in pairs:
                torch.matmul(x, w.t())
        return fn

    every = [(xs[k], w) for i in range(len(layers)) for k in ("qkv", "o", "gate_up", "down")
             for w in (kinds[k][i],)] + [(xs["lm_head"], lm_head)]
    rows = []
    for kind, pairs in [*((k, [(xs[k], w) for w in ws]) for k, ws in kinds.items()), ("all (model order)", every)]:
        ms = timed_ms(run(pairs), w0.device, reps)
        nbytes = sum(w.numel() * w.element_size() for _, w in pairs)
        flops = sum(2 * batch * w.numel() for _, w in pairs)
        rows.append({"batch": batch, "kind": kind, "count": len(pairs), "ms": ms, "weight_gb": nbytes / 1e9,
                     "gb_per_s": nbytes / ms / 1e6, "tflops": flops / ms / 1e9})
    return rows


def copy_row(device: torch.device, reps: int) -> dict[str, Any]:
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.ones(n // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, reps)
    read_ms = timed_ms(lambda: src.sum(), device, reps)  # read-only: the pattern of streaming weights
    return {"bytes": n, "ms": ms, "read_write_gb_per_s": 2 * n / ms / 1e6, "sum_ms": read_ms,
            "read_gb_per_s": n / read_ms / 1e6}


# --- output -----------------------------------------------------------------------------------------

def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*r))


def print_profile(tag: str, wall: float, p: StepProfile) -> None:
    print(f"\n[{tag}] kernel time {p.kernel_ms:.3f} ms/step, eager wall {wall:.3f} ms/step (sync'd, unprofiled); "
          f"{100 * p.scoped:.0f}% of kernel time linked to its launching op")
    print_table(["category", "ms/step", "%"],
                [[c, f"{v:.3f}", f"{100 * v / max(p.kernel_ms, 1e-9):.1f}"] for c, v in p.by_category.items() if v])
    print_table(["top kernels", "category", "ms/step", "calls", "us/call"],
                [[t["kernel"], t["category"], f"{t['ms_per_step']:.3f}", f"{t['calls_per_step']:g}",
                  f"{t['us_per_call']:.1f}"] for t in p.top])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/qwen3-8b", help="config folder (dummy weights)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--kv", nargs="+", default=["int4-bdr"])
    p.add_argument("--batch", nargs="+", type=int, default=[64, 256])
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=5, help="decode steps profiled (and timed unprofiled)")
    p.add_argument("--warm-steps", type=int, default=3, help="decode steps after prefill before measuring")
    p.add_argument("--gemm-reps", type=int, default=10)
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                   help="shrink the config to 2 small layers (default: on without CUDA)")
    p.add_argument("--kv-cache-memory", default=None, help="fixed pool size (e.g. 40GiB); default: --mem-fraction")
    p.add_argument("--mem-fraction", type=float, default=PoolOptions.mem_fraction)
    p.add_argument("--out", default="bench/out/decode-profile.json")
    args = p.parse_args()

    from saw_worker.flags import parse_bytes

    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    tiny = (not on_gpu) if args.tiny is None else args.tiny
    tmp = tempfile.TemporaryDirectory()
    model = tiny_model_dir(args.model, Path(tmp.name)) if tiny else args.model
    if tiny:
        print(f"using a shrunken copy of {args.model} ({TINY}): a smoke test, not a measurement", flush=True)
    if not on_gpu:
        print("no CUDA: profiling CPU ops (self time), matmuls timed on the host", flush=True)

    meta: dict[str, Any] = {"device": device_name, "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
                            "model": args.model, "tiny": tiny, "context": args.context, "steps": args.steps}
    profiles: list[dict[str, Any]] = []
    gemms: list[dict[str, Any]] = []
    copy: dict[str, Any] | None = None
    for kv in args.kv:
        memory = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None
        opts = WorkerOptions(model=ModelOptions(name=model, load_format=args.load_format),
                             kv=KVOptions(name=kv, k_center=False, hadamard_order=128),
                             pool=PoolOptions(mem_fraction=args.mem_fraction, kv_cache_memory=memory),
                             scheduler=SchedulerOptions(max_running_requests=max(args.batch)),
                             decode=DecodeOptions(cuda_graphs=False))
        t0 = time.perf_counter()
        engine = build_engine(opts)
        info = engine.info()
        print(f"[{kv}] built in {time.perf_counter() - t0:.1f}s, KV capacity {info.kv_capacity_tokens} tokens",
              flush=True)
        for b in args.batch:
            need = b * engine.scheduler.pool.pages_for(args.context + args.warm_steps + 3 * args.steps + 2)
            if need > engine.scheduler.pool.free_pages:
                print(f"[{kv}] batch {b}: skipped, needs {need} KV pages, the pool has "
                      f"{engine.scheduler.pool.free_pages}", flush=True)
                continue
            seqs, prefill_s = fill(engine, b, args.context, args.warm_steps, f"{kv}-{b}")
            wall = wall_ms(engine, b, args.steps)
            prof = profile_steps(engine, b, args.steps)
            ctx = len(seqs[0].token_ids)
            release(engine, seqs)
            tag = f"{kv} B={b} ctx~{ctx}"
            print(f"[{tag}] prefill {prefill_s:.1f}s", flush=True)
            print_profile(tag, wall, prof)
            profiles.append({"kv": kv, "batch": b, "context": ctx, "prefill_s": prefill_s, "wall_ms": wall,
                             "kernel_ms": prof.kernel_ms, "scoped_fraction": prof.scoped,
                             "categories_ms": prof.by_category, "top": prof.top})
        if not gemms:  # the matmul and copy references need only the weights: once, with the first engine
            for b in args.batch:
                gemms += gemm_rows(engine.runner.model, b, args.gemm_reps)
            copy = copy_row(engine.runner.device, args.gemm_reps)
        del engine
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    if profiles:
        print("\nkernel ms/step by category")
        cols = [f"{r['kv']}/{r['batch']}" for r in profiles]
        rows = [[c] + [f"{r['categories_ms'][c]:.3f}" for r in profiles] for c in CATEGORIES]
        rows.append(["= kernels"] + [f"{r['kernel_ms']:.3f}" for r in profiles])
        rows.append(["eager wall"] + [f"{r['wall_ms']:.3f}" for r in profiles])
        print_table(["category"] + cols, rows)
    if gemms:
        print("\nbare torch.matmul x @ W.T at M=batch (model's weights; CUDA-graph replay on GPU)")
        print_table(["M", "kind", "n", "ms", "weight GB", "GB/s", "TFLOP/s"],
                    [[str(r["batch"]), r["kind"], str(r["count"]), f"{r['ms']:.3f}", f"{r['weight_gb']:.2f}",
                      f"{r['gb_per_s']:.0f}", f"{r['tflops']:.1f}"] for r in gemms])
    if copy:
        print(f"\ndevice copy_ of {copy['bytes'] / 2**20:.0f} MiB: {copy['ms']:.3f} ms, "
              f"{copy['read_write_gb_per_s']:.0f} GB/s counting bytes read + written; sum() of it (read only): "
              f"{copy['sum_ms']:.3f} ms, {copy['read_gb_per_s']:.0f} GB/s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "profiles": profiles, "gemm": gemms, "copy": copy}, indent=1))
    print(f"\nwrote {out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
