"""saw's extend kernel against FlashAttention-3 (sgl_kernel's build, staged with SGLang) on a 16k prompt's two
prefill chunks, Qwen3-8B attention (32 q / 8 kv heads, D 128), pages of 16. Issue 18: long-prompt TTFT.

    PYTHONPATH=python:/tmp/ssite:/tmp/sdsite python3 bench/sweeps/prefill-h200-2026-12-06/fa3_extend.py

Rows, ms and TFLOP/s of causal attention (do_bench medians):
- first chunk, 2 x 8192 new tokens, no prefix: saw (bf16 cache / int4-bdr), FA3 varlen causal, torch SDPA;
- second chunk, 2 x (8192 cached + 8192 new): saw over a bf16 / int4-bdr paged prefix; FA3 over the bf16 pages
  (flash_attn_with_kvcache with the page table: what a bf16 cache could use as it is); FA3 on the new tokens alone
  (the causal part an INT4 prefix would leave to FA3, combined with saw's prefix pass by log-sum-exp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kernels_bench import DEV, HKV, HQ, PS, D, alloc_cache, bench, make_fmt, paged_table  # noqa: E402

from saw_kernels import extend_attention  # noqa: E402


def flops(batch: int, prefix: int, new: int) -> float:
    return 4 * batch * HQ * D * (new * prefix + new * (new + 1) / 2)


def report(name: str, ms: float, f: float) -> None:
    print(f"| {name} | {ms:.3f} | {f / ms / 1e9:.0f} |", flush=True)


def saw_row(kv: str, batch: int, prefix: int, new: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    fmt = make_fmt(kv)
    table = paged_table(batch, prefix + new)
    cache = alloc_cache(fmt, (batch * (prefix + new) // PS + 1) * PS)
    cu = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=DEV)
    pre = torch.full((batch,), prefix, dtype=torch.int32, device=DEV)
    us = bench(lambda: extend_attention(q, k, v, cu, pre, cache, table, D ** -0.5, max_new_len=new,
                                        max_prefix_len=prefix), graph=False)
    report(f"saw extend, {kv}", us / 1e3, flops(batch, prefix, new))


def main() -> None:
    from sgl_kernel.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    torch.manual_seed(0)
    batch, n = 2, 8192
    q = torch.randn(batch * n, HQ, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(batch * n, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.arange(0, batch * n + 1, n, dtype=torch.int32, device=DEV)
    print(f"{torch.cuda.get_device_name()}\n\n| kernel | ms | TFLOP/s |\n|---|---:|---:|")
    print("| **first chunk: 2 x 8192 new** | | |")
    for kv in ("bf16", "int4-bdr-b128"):
        saw_row(kv, batch, 0, n, q, k, v)
    us = bench(lambda: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True), graph=False)
    report("FA3 varlen, causal", us / 1e3, flops(batch, 0, n))
    qs, ks, vs = (x.view(batch, n, -1, D).transpose(1, 2) for x in (q, k, v))
    us = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True),
               graph=False)
    report("torch SDPA, is_causal, enable_gqa", us / 1e3, flops(batch, 0, n))

    print("| **second chunk: 2 x (8192 cached + 8192 new)** | | |")
    for kv in ("bf16", "int4-bdr-b128"):
        saw_row(kv, batch, n, n, q, k, v)
    table = paged_table(batch, 2 * n)
    pool_k = torch.randn(batch * 2 * n + PS, HKV, D, device=DEV, dtype=torch.bfloat16)
    kc, vc = pool_k.view(-1, PS, HKV, D), torch.randn_like(pool_k).view(-1, PS, HKV, D)
    lens = torch.full((batch,), 2 * n, dtype=torch.int32, device=DEV)
    us = bench(lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, page_table=table, cu_seqlens_q=cu,
                                               max_seqlen_q=n, causal=True), graph=False)
    report("FA3 paged bf16 (prefix + new), causal", us / 1e3, flops(batch, n, n))
    us = bench(lambda: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True, return_softmax_lse=True),
               graph=False)
    report("FA3 varlen, new tokens only (+ lse)", us / 1e3, flops(batch, 0, n))


if __name__ == "__main__":
    main()
