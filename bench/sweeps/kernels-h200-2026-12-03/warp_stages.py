"""The warp decode kernel's variants at the decode shapes: 16- or 32-token steps (STEP, patched), register
caps (maxnreg) and shared buffers (num_stages), int4-bdr b128 + kc with and without the default's ring;
bf16 alongside. Each variant's output is checked against the tile kernel's before it is timed.

    PYTHONPATH=python python3 bench/sweeps/kernels-h200-2026-12-03/warp_stages.py [--shapes 256x768,...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernels_bench as kb  # noqa: E402

import saw_kernels.decode_int4_warp as warp  # noqa: E402
from saw_kernels import DecodeTuning, decode_attention  # noqa: E402
from saw_kv.formats import encode_q  # noqa: E402

# name: (tokens per step, DecodeTuning fields)
VARIANTS = {
    "s16": (16, {"maxnreg": 255}),
    "s16-r168": (16, {"maxnreg": 168}),
    "s16-r128": (16, {"maxnreg": 128}),
    "s32-r168": (32, {"maxnreg": 168}),
    "s32-r128": (32, {"maxnreg": 128}),
    "s32-r255": (32, {"maxnreg": 255}),
    "s32-r168-st3": (32, {"maxnreg": 168, "num_stages": 3}),
}


def use_step(step: int) -> None:
    warp.warp_step = lambda group_rows: step


def check(batch: int, ctx: int, kv: str, cfg: dict) -> float:
    """max |warp(cfg) - tile| / max |tile| on random pages (the benchmark's inputs, no ring), random lengths."""
    fmt = kb.make_fmt(kv)
    table = kb.paged_table(batch, ctx)
    cache = kb.alloc_cache(fmt, (table.numel() + 1) * kb.PS)
    cache = replace(cache, k_mean=torch.randn(kb.HKV, kb.D, device=kb.DEV) if fmt.k_center else None)
    q = encode_q(torch.randn(batch, kb.HQ, kb.D, device=kb.DEV, dtype=torch.bfloat16), fmt)
    lens = torch.randint(1, ctx + 1, (batch,), dtype=torch.int32, device=kb.DEV)
    outs = [decode_attention(q, cache, table, lens, kb.D ** -0.5, q_rotated=True, tuning=DecodeTuning(**c))
            for c in ({"impl": "tile"}, cfg)]
    return ((outs[1].float() - outs[0].float()).abs().max() / outs[0].float().abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="256x768,64x4096,16x16384,128x2048")
    ap.add_argument("--kv", default=f"int4-bdr-b128-kc,{kb.DEFAULT_KV}")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    copy = kb.copy_gbps(2 << 30)
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)", flush=True)
    names = args.variants.split(",")
    for shape in args.shapes.split(","):
        b, ctx = (int(x) for x in shape.split("x"))
        for name in names:
            step, cfg = VARIANTS[name]
            use_step(step)
            print(f"check {shape} {name}: rel err vs tile {check(b, ctx, 'int4-bdr-b128-kc', cfg):.2e}", flush=True)
        kb.run_decode(b, ctx, "bf16", copy)
        for kv in args.kv.split(","):
            for name in names:
                step, cfg = VARIANTS[name]
                use_step(step)
                kb.run_decode(b, ctx, kv, copy, kernel=name, cfg=cfg)


if __name__ == "__main__":
    main()
