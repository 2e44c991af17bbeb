"""Kernel benchmark (issue 4): write, decode and extend against the copy-bandwidth floor.

    python bench/kernels_bench.py --out bench/results/kernels-h100-<date>.json

Times with CUDA-graph replays (write, decode: the engine's mode) or triton.testing.do_bench
(extend, SDPA), medians. Bytes are the ones that must move (each input read once, each output
written once); copy bandwidth is a large device-to-device copy in the same run (read + write).
`--smoke` runs tiny shapes (CPU interpreter too) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from saw_kernels import (  # noqa: E402
    DecodeTuning,
    ExtendTuning,
    Ring,
    WriteTuning,
    decode_attention,
    extend_attention,
    write_kv,
    write_window,
)
from saw_kv.cache import LayerCache  # noqa: E402
from saw_kv.formats import KVFormat, encode_q  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HQ, HKV, D, PS = 32, 8, 128, 16  # Qwen3-8B attention, engine page size
DEFAULT_KV = "int4-bdr-b128-kc-s4-w16"  # the engine's INT4 default at head_dim 128 (formats.default_kv_options)
# as these kernels see it: its K scale is applied to q and k by the fused q/k-norm + RoPE kernel before them


def bench(fn, graph: bool = True) -> float:
    """Median microseconds."""
    if DEV.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    fn()
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3


def copy_gbps(nbytes: int) -> float:
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).normal_()
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x), graph=False)
    return 2 * x.numel() * 4 / us / 1e3


def make_fmt(kv: str) -> KVFormat:
    """kv spelled like 'int4-bdr-b16-rv-kc-s4-w32' (w32: a bf16 window of 32, s4: 4 sinks)."""
    parts = kv.split("-")
    name = "int4-bdr" if kv.startswith("int4-bdr") else parts[0]

    def number(prefix: str, default: int) -> int:
        return next((int(p[1:]) for p in parts if p.startswith(prefix) and p[1:].isdigit()), default)

    return KVFormat(name, D, number("b", 128), "rv" in parts, "kc" in parts, window=number("w", 0),
                    sinks=number("s", 0))


def make_ring(fmt: KVFormat, batch: int, ends: int) -> tuple[Ring, dict[str, torch.Tensor]]:
    """Full sinks and a full window for each request (its W tokens before position `ends`), rows in order: the
    step's Ring and the ring tensors of the cache (LayerCache fields ring_k, ring_v)."""
    k = torch.randn(batch, fmt.ring_slots, HKV, D, device=DEV, dtype=torch.bfloat16)
    full = torch.full((batch,), fmt.window, dtype=torch.int32, device=DEV)
    sinks = torch.full_like(full, fmt.sinks) if fmt.sinks else None
    ring = Ring(torch.arange(batch, dtype=torch.int32, device=DEV), full, torch.full_like(full, ends), sinks)
    return ring, dict(ring_k=k, ring_v=torch.randn_like(k))


def alloc_cache(fmt: KVFormat, slots: int) -> LayerCache:
    """Random pages (and params) of slots tokens; k_mean and the ring are added with dataclasses.replace."""
    if fmt.quantized:
        k = torch.randint(0, 256, (slots, HKV, D // 2), dtype=torch.uint8, device=DEV)
        p = torch.rand(slots, HKV, 2, device=DEV).to(torch.float16) * 0.1
        p[..., 1] -= 0.5
        return LayerCache(k, k.clone(), fmt, PS, p, p.clone())
    k = torch.randn(slots, HKV, D, device=DEV, dtype=torch.bfloat16)
    return LayerCache(k, k.clone(), fmt, PS)


def paged_table(batch: int, ctx: int) -> torch.Tensor:
    """Each request's pages are a random permutation of the pool (pages 1..), like a fragmented pool."""
    pages = ctx // PS
    perm = torch.randperm(batch * pages, device=DEV).int() + 1
    return perm.view(batch, pages)


def run_write(t: int, kv: str, copy: float, cfg: dict | None = None, with_q: bool = False) -> dict:
    """with_q: a decode step's write, which also rotates the step's queries (int4-bdr)."""
    fmt = make_fmt(kv)
    k = torch.randn(t, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(t, HKV, D, device=DEV, dtype=torch.bfloat16)
    k[:, :, 7] += 10
    slots = (paged_table(1, t).long().view(-1, 1) * PS + torch.arange(PS, device=DEV)).view(-1)
    cache = alloc_cache(fmt, (t // PS + 1) * PS)
    mean = torch.randn(HKV, D, device=DEV) if fmt.k_center else None
    cache = replace(cache, k_mean=mean)
    q = torch.randn(t, HQ, D, device=DEV, dtype=torch.bfloat16) if with_q else None
    cfg = cfg or {}
    tuning = WriteTuning(**cfg)
    us = bench(lambda: write_kv(k, v, slots, cache, q, tuning=tuning))
    nbytes = 2 * k.numel() * 2 + slots.numel() * 8 + t * HKV * fmt.bytes_per_token_head()
    if with_q and fmt.rotated:
        nbytes += q.numel() * (2 + 4)
    return row("write+q" if with_q else "write", kv, f"T={t},Hkv={HKV},D={D}", us, nbytes, copy, cfg)


def run_write_window(t: int, copy: float) -> dict:
    """A decode step's ring write (write_window): K and V of t tokens, V a slice of a fused qkv row."""
    fmt = make_fmt(DEFAULT_KV)
    kv = torch.randn(t, 2, HKV, D, device=DEV, dtype=torch.bfloat16)
    rk = torch.randn(t, fmt.ring_slots, HKV, D, device=DEV, dtype=torch.bfloat16)
    rv = torch.randn_like(rk)
    slots = torch.arange(t, device=DEV) * fmt.ring_slots + 5
    us = bench(lambda: write_window(kv[:, 0], kv[:, 1], slots, rk, rv))
    return row("write-window", DEFAULT_KV, f"T={t},Hkv={HKV},D={D}", us, 2 * 2 * kv.numel() + slots.numel() * 8, copy)


def run_decode(batch: int, ctx: int, kv: str, copy: float, kernel: str = "decode", cfg: dict | None = None) -> dict:
    """Rotated formats get q as the engine passes it: rotated by the write launch (fp32 R q); cfg
    q_rotated=False times the kernel rotating bf16 q itself. With a window, ctx tokens are INT4 and S + W
    more bf16 (the ring, full: the sinks before the INT4 ones, the window after), plus the new token."""
    fmt = make_fmt(kv)
    table = paged_table(batch, ctx + PS * (fmt.sinks > 0))
    cache = alloc_cache(fmt, (table.numel() + 1) * PS)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=torch.bfloat16)
    lens = torch.full((batch,), ctx + fmt.sinks, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    cfg = dict(cfg or {})
    q_rotated = cfg.pop("q_rotated", fmt.rotated)
    mean = torch.randn(HKV, D, device=DEV) if fmt.k_center else None
    cache = replace(cache, k_mean=mean)
    q_in = encode_q(q, fmt) if q_rotated else q
    win: dict = {}
    nbytes = batch * ctx * HKV * fmt.bytes_per_token_head() + 2 * q.numel() * 2 + table.numel() * 4
    if fmt.window:
        kv_new = torch.randn(batch, 2, HKV, D, device=DEV, dtype=torch.bfloat16)
        ring, ring_tensors = make_ring(fmt, batch, ctx + fmt.ring_slots)
        cache = replace(cache, **ring_tensors)
        win = dict(ring=ring, q_plain=q, k_new=kv_new[:, 0], v_new=kv_new[:, 1])
        nbytes += batch * HKV * (fmt.window_bytes_per_head() + 2 * D * 2)
    tuning = DecodeTuning(**cfg)
    us = bench(lambda: decode_attention(q_in, cache, table, lens, D ** -0.5, out=out, q_rotated=q_rotated, **win,
                                        tuning=tuning))
    return row(kernel, kv, f"B={batch},ctx={ctx},Hq={HQ},Hkv={HKV},D={D}", us, nbytes, copy, cfg)


def run_extend(batch: int, prefix: int, new: int, kv: str, copy: float, cfg: dict | None = None) -> list[dict]:
    fmt = make_fmt(kv)
    table = paged_table(batch, prefix + new)
    cache = alloc_cache(fmt, (batch * (prefix + new) // PS + 1) * PS)
    tn = batch * new
    q = torch.randn(tn, HQ, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(tn, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(tn, HKV, D, device=DEV, dtype=torch.bfloat16)
    cu = torch.arange(0, tn + 1, new, dtype=torch.int32, device=DEV)
    pre = torch.full((batch,), prefix, dtype=torch.int32, device=DEV)
    mean = torch.randn(HKV, D, device=DEV) if fmt.k_center else None
    cache = replace(cache, k_mean=mean)
    # with a window: prefix INT4 tokens, then W bf16 ones (a first chunk has neither)
    ring = None
    if fmt.window and prefix:
        ring, ring_tensors = make_ring(fmt, batch, prefix + fmt.window)
        cache = replace(cache, **ring_tensors)
    w = fmt.ring_slots if ring else 0

    cfg = cfg or {}
    tuning = ExtendTuning(**cfg)

    def fn() -> None:
        extend_attention(q, k, v, cu, pre, cache, table, D ** -0.5, max_new_len=new, max_prefix_len=prefix,
                         ring=ring, tuning=tuning)  # the host knows the prefixes

    us = bench(fn, graph=False)
    flops = 4 * batch * HQ * D * (new * (prefix + w) + new * (new + 1) / 2)
    nbytes = batch * (prefix * fmt.bytes_per_token_head() + w * 4 * D) * HKV + 2 * (q.numel() * 2 + k.numel() * 2)
    r = row("extend", kv, f"B={batch},prefix={prefix},new={new},Hq={HQ},Hkv={HKV},D={D}", us, nbytes, copy, cfg,
            tflops=flops / us / 1e6)
    return [r]


def run_sdpa(batch: int, prefix: int, new: int, copy: float) -> dict:
    """torch SDPA on contiguous bf16: q [B, Hq, new], k/v [B, Hq, prefix+new], bottom-right causal
    (with no prefix that is plain is_causal, the path a first chunk takes)."""
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(batch, HQ, new, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(batch, HQ, prefix + new, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    causal = dict(is_causal=True) if prefix == 0 else dict(attn_mask=causal_lower_right(new, prefix + new))
    f = torch.nn.functional.scaled_dot_product_attention
    us = bench(lambda: f(q, k, v, **causal), graph=False)
    flops = 4 * batch * HQ * D * (new * prefix + new * (new + 1) / 2)
    return row("extend-sdpa", "bf16-contiguous", f"B={batch},prefix={prefix},new={new},Hq={HQ},D={D}", us,
               2 * (q.numel() + 2 * k.numel()) * 2, copy, tflops=flops / us / 1e6)


ROWS: list[dict] = []
OUT_FILES: list[Path] = []


def row(kernel: str, kv: str, shape: str, us: float, nbytes: float, copy: float, cfg: dict | None = None,
        tflops: float | None = None) -> dict:
    gbps = nbytes / us / 1e3
    dev = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu-interpreter"
    r = {"kernel": kernel, "kv": kv, "shape": shape, "us": round(us, 2), "gbps": round(gbps, 1),
         "copy_gbps": round(copy, 1), "frac_copy": round(gbps / copy, 3), "device": dev}
    if tflops is not None:
        r["tflops"] = round(tflops, 1)
    if cfg:
        r["config"] = cfg
    print(f"{kernel:14s} {kv:24s} {shape:44s} {us:10.1f} us {gbps:6.0f} GB/s {gbps / copy:6.1%}"
          + (f" {tflops:5.0f} TF/s" if tflops is not None else "") + (f" {cfg}" if cfg else ""), flush=True)
    ROWS.append(r)
    for f in OUT_FILES:  # rewrite after every row: a run cut short still leaves its numbers
        f.write_text(json.dumps(ROWS, indent=1))
    return r


def sweep(name: str, fn, configs: list[dict]) -> dict:
    """Time fn(cfg) for each config; return the fastest (its rows are kept, kernel 'sweep-...')."""
    best, best_us = configs[0], float("inf")
    for cfg in configs:
        try:
            r = fn(cfg)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is just skipped
            print(f"{name} {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r["kernel"] = f"sweep-{name}"
        if r["us"] < best_us:
            best, best_us = cfg, r["us"]
    print(f"best {name}: {best} {best_us:.1f} us", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--only", default="write,decode,latency,extend")
    ap.add_argument("--decode-shapes", help="BxCTX,... instead of the decode shapes (e.g. 256x768: D(256,1024) c=256)")
    ap.add_argument("--decode-kv", help="formats to decode, comma-separated, instead of the list")
    args = ap.parse_args()
    torch.manual_seed(0)
    only = set(args.only.split(","))
    smoke = args.smoke or DEV.type != "cuda"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        OUT_FILES.append(args.out)
    if os.environ.get("OUT"):
        OUT_FILES.append(Path(os.environ["OUT"], "kernels.json"))
    t0 = time.time()
    copy = copy_gbps(1 << 22 if smoke else 2 << 30)
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)", flush=True)
    kvs_write = ["bf16", "int4", "int4-bdr-b16", "int4-bdr-b32", "int4-bdr-b64", "int4-bdr-b128",
                 "int4-bdr-b128-rv", "int4-bdr-b128-kc", "int4-kc"]
    kvs_decode = ["int4", "int4-bdr-b128", "int4-bdr-b16", "int4-bdr-b128-rv", "int4-bdr-b128-kc", DEFAULT_KV,
                  "int4-bdr-b128-kc-w32", "int4-kc-s4-w16"]
    if args.decode_kv:
        kvs_decode = args.decode_kv.split(",")
    if smoke:
        write_shapes, dec_shapes, lat_b, lat_ctx, ext = [64], [(2, 64)], [1], [64], (2, 48, 16)
    else:
        write_shapes, dec_shapes = [8192, 32768], [(64, 4096), (16, 16384), (128, 2048)]
        lat_b, lat_ctx, ext = [1, 4, 8], [1024, 4096, 16384, 32768], (8, 16384, 2048)
    if args.decode_shapes:
        dec_shapes = [tuple(int(x) for x in s.split("x")) for s in args.decode_shapes.split(",")]
    sweeping = not (smoke or args.no_sweep)
    wcfg: dict = {}
    if "write" in only:
        for t in write_shapes:
            for kv in kvs_write:
                run_write(t, kv, copy, wcfg)
        for kv in ("int4", "int4-bdr-b128", DEFAULT_KV):  # a decode step's write (batch 64), with its queries
            run_write(64, kv, copy, wcfg)
            run_write(64, kv, copy, wcfg, with_q=True)
        run_write_window(64, copy)
    dcfg: dict = {}
    bcfg: dict = {}
    if "decode" in only or "latency" in only:
        if sweeping:
            # the tile kernel (decode_int4.py) against the warp kernel (decode_int4_warp.py) and its program
            # counts (num_splits: programs per pair; the default is one per warp slot)
            for b, ctx in dec_shapes:
                sweep("decode-int4", lambda c, b=b, ctx=ctx: run_decode(b, ctx, "int4-bdr-b128", copy, cfg=c),
                      [{}, dict(impl="tile")]
                      + [dict(impl="warp", num_splits=s) for s in (1, 2, 3, 4, 6, 8)])
    if "decode" in only:
        for b, ctx in dec_shapes:
            run_decode(b, ctx, "bf16", copy, cfg=bcfg)
            for kv in kvs_decode:
                run_decode(b, ctx, kv, copy, cfg=dcfg)
            for kv in ("int4", "int4-bdr-b128"):
                run_decode(b, ctx, kv, copy, "decode-tile", cfg={**dcfg, "impl": "tile"})
            run_decode(b, ctx, "int4-bdr-b128", copy, "decode-qrot", cfg={**dcfg, "q_rotated": False})
    if "latency" in only:
        for kv in ("bf16", "int4-bdr-b128", DEFAULT_KV):
            for b in lat_b:
                for ctx in lat_ctx:
                    run_decode(b, ctx, kv, copy, "decode-latency", cfg=bcfg if kv == "bf16" else dcfg)
    if "extend" in only:
        ecfg: dict = {}
        if sweeping:
            ecfg = sweep("extend", lambda c: run_extend(*ext, "int4-bdr-b128", copy, c)[0],
                         [{}, dict(deq=3), dict(num_stages=3), dict(block_m=64, num_warps=4, num_stages=3)])
        # a 16k prompt prefilled in two chunks of 8192 (no prefix, then 8192 cached): 2/3 of its
        # attention is the causal new-token phase
        chunks = [(1, 0, 32), (1, 32, 32)] if smoke else [(2, 0, 8192), (2, 8192, 8192)]
        for shape, kvs in [(ext, ("bf16", "int4", "int4-bdr-b128", "int4-bdr-b128-rv-kc", DEFAULT_KV)),
                           *[(c, ("bf16", "int4-bdr-b128", DEFAULT_KV)) for c in chunks]]:
            for kv in kvs:
                run_extend(*shape, kv, copy, ecfg)
            if DEV.type == "cuda":
                try:
                    run_sdpa(*shape, copy)
                except Exception as e:  # noqa: BLE001 - report, keep the other numbers
                    print(f"sdpa {shape} failed: {e!r}")
    print(f"bench wall time {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
