"""int4-bdr decode (warp kernel, in-kernel combine) at the issue's shapes and latency shapes, uncapped and
with ptxas register caps (16 warps per SM at 128), twice in alternation; bf16 once for the ratio."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
shapes = [(64, 4096), (16, 16384), (128, 2048), (1, 1024), (1, 32768), (8, 32768)]
for b, ctx in shapes[:3]:
    kb.run_decode(b, ctx, "bf16", c)
for _ in range(2):
    for cap in (None, 128):
        for b, ctx in shapes:
            kb.run_decode(b, ctx, "int4-bdr-b128", c, cfg={} if cap is None else dict(maxnreg=cap))
