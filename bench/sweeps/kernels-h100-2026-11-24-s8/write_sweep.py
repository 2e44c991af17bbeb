"""Fused KV write (write_kv) on the GPU: copy bandwidth, then CUDA-graph medians per format and config.

    git show 7d51d14:python/saw_kernels/write.py > write_head.py   # the "before" (run 3)
    PYTHONPATH=python python3 bench/sweeps/kernels-h100-2026-11-24-s8/write_sweep.py [--head write_head.py]
        [--sweep CFGS] [--no-table]

The table times every format at T = 8192 and 32768 with the current write_kv defaults (the "after") and,
given --head, an older write.py (the "before"), then a decode step's write (B = 64, with q). --sweep
times launch configs (JSON list of write_kv kwargs) on --sweep-kvs (default int4,
int4-bdr-b128, int4-bdr-b128-kc).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "bench"))

import kernels_bench as kb  # noqa: E402  (puts python/ on sys.path)

import saw_kernels.write as new  # noqa: E402

KVS = ["bf16", "int4", "int4-kc", "int4-bdr-b16", "int4-bdr-b64", "int4-bdr-b128", "int4-bdr-b128-kc",
       "int4-bdr-b128-rv", "int4-bdr-b128-rv-kc"]
SWEEP_KVS = ["int4", "int4-bdr-b128", "int4-bdr-b128-kc"]
TS = [8192, 32768]


def load_head(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("write_head", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(impl: ModuleType, t: int, kv: str, copy: float, cfg: dict | None = None, with_q: bool = False) -> dict:
    kb.write_kv = impl.write_kv
    return kb.run_write(t, kv, copy, cfg, with_q=with_q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", type=json.loads, default=[])
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--head", type=Path, help="an older write.py to time as the 'before'")
    ap.add_argument("--sweep-kvs", nargs="+", default=SWEEP_KVS)
    args = ap.parse_args()
    copy = kb.copy_gbps(2 << 30)
    print(f"copy {copy:.0f} GB/s", flush=True)
    res: dict[tuple[str, str, int], float] = {}
    impls = [] if args.no_table else ([("head", load_head(args.head))] if args.head else []) + [("new", new)]
    for name, impl in impls:
        print(f"--- {name}", flush=True)
        for t in TS:
            for kv in KVS:
                res[(name, kv, t)] = timed(impl, t, kv, copy)["us"]
        res[(name, "int4-bdr-b128-kc+q", 64)] = timed(impl, 64, "int4-bdr-b128-kc", copy, with_q=True)["us"]
    for cfg in args.sweep:
        print(f"--- sweep {cfg}", flush=True)
        for t in TS:
            for kv in args.sweep_kvs:
                try:
                    timed(new, t, kv, copy, cfg)
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported and skipped
                    print(f"{kv} T={t} {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if len(impls) == 2:
        print("\nkv                     T   before us (of copy)   after us (of copy)")
        for t in TS:
            for kv in KVS:
                b, a = res[("head", kv, t)], res[("new", kv, t)]
                nb = next(r["gbps"] * r["us"] for r in kb.ROWS if r["kv"] == kv and r["shape"].startswith(f"T={t},"))
                print(f"{kv:20s} {t:6d}   {b:8.1f} ({nb / b / copy:6.1%})   {a:8.1f} ({nb / a / copy:6.1%})")
        kq = "int4-bdr-b128-kc+q"
        print(f"{kq:20s} {'B=64':>6s}   {res[('head', kq, 64)]:8.1f}            {res[('new', kq, 64)]:8.1f}")
    for cache in getattr(new._write_kernel, "device_caches", {}).values():
        for key, k in cache[0].items():
            print(f"n_regs {k.n_regs} shared {k.metadata.shared} warps {k.metadata.num_warps} key {str(key)[-160:]}")

if __name__ == "__main__":
    main()
