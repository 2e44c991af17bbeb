"""The warp kernel capped at 128 registers (16 warps per SM instead of 12; 4 spill loads/stores per
step) against the default, at the issue's three shapes, with the splits of each residency."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
shapes = [(64, 4096, 3, 4), (16, 16384, 12, 16), (128, 2048, 3, 2)]
for b, ctx, s12, _ in shapes:
    kb.run_decode(b, ctx, "bf16", c)
    kb.run_decode(b, ctx, "int4-bdr-b128", c, cfg=dict(num_splits=s12))
for b, ctx, _, s16 in shapes:
    for kv in ("int4", "int4-bdr-b128"):
        kb.run_decode(b, ctx, kv, c, cfg=dict(maxnreg=128, num_splits=s16))
    kb.run_decode(b, ctx, "int4-bdr-b128", c, cfg=dict(maxnreg=128))
