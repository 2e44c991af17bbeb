"""The warp kernel at the issue's three shapes: the split count warp_num_splits picks, then others."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
for b, ctx, splits in [(64, 4096, (2, 3, 4, 6)), (16, 16384, (8, 12, 13, 16)), (128, 2048, (1, 2, 3, 4, 5))]:
    kb.run_decode(b, ctx, "bf16", c)
    kb.run_decode(b, ctx, "int4", c)
    kb.run_decode(b, ctx, "int4-bdr-b128", c)
    for s in splits:
        kb.run_decode(b, ctx, "int4-bdr-b128", c, cfg=dict(impl="warp", num_splits=s))
