"""Decode over ragged batches, the serving case: B requests with lengths drawn uniformly from [lo, hi]
(seed 0), the page table as wide as the longest; int4-bdr (q rotated) and bf16, whichever tree is first
on the path. Bytes are the ones the lengths need."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402
import torch  # noqa: E402

from saw_kernels import decode_attention  # noqa: E402
from saw_worker.kv.formats import rotate  # noqa: E402


def run(lens_list: list[int], width: int, kv: str, copy: float) -> None:
    b = len(lens_list)
    fmt = kb.make_fmt(kv)
    table = kb.paged_table(b, width)
    kc, vc, kp, vp = kb.alloc_cache(fmt, (b * width // kb.PS + 1) * kb.PS)
    q = torch.randn(b, kb.HQ, kb.D, device=kb.DEV, dtype=torch.bfloat16)
    q_in = rotate(q.double(), fmt.hadamard_order).float() if fmt.rotated else q
    lens = torch.tensor(lens_list, dtype=torch.int32, device=kb.DEV)
    out = torch.empty_like(q)
    us = kb.bench(lambda: decode_attention(q_in, kc, vc, kp, vp, table, lens, kb.PS, fmt, kb.D ** -0.5, out=out,
                                           q_rotated=fmt.rotated))
    nbytes = sum(lens_list) * kb.HKV * fmt.bytes_per_token_head() + 2 * q.numel() * 2
    kb.row("decode-ragged", kv, f"B={b},max={width},sum={sum(lens_list)}", us, nbytes, copy)


c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
for b, lo, hi in [(64, 64, 8192), (128, 16, 4096), (16, 256, 32768), (8, 1, 32768)]:
    lens_list = torch.randint(lo, hi + 1, (b,), generator=torch.Generator().manual_seed(0)).tolist()
    for kv in ("bf16", "int4-bdr-b128"):
        run(lens_list, hi, kv, c)
