"""The warp kernel with 2 / 4 / 8 shared buffers per operand (run 5), at the issue's three shapes."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

import saw_kernels.decode_int4_warp as w  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
for nb in (2, 4, 8):
    w.NBUF = nb
    for b, ctx in [(64, 4096), (16, 16384), (128, 2048)]:
        for s in ([None, 2, 3, 4, 6] if b != 16 else [None, 8, 12, 16]):
            cfg = dict(impl="warp") if s is None else dict(impl="warp", num_splits=s)
            kb.run_decode(b, ctx, "int4-bdr-b128", c, cfg=cfg)
