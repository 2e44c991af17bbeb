"""The default int4-bdr decode at the issue's shapes and two latency shapes, whole (decode kernel + reduce)
and with the reduce launch skipped (the decode kernel alone), for whichever tree is first on the path."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

import saw_kernels.decode as dec  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
shapes = [(64, 4096), (16, 16384), (128, 2048), (1, 1024), (8, 32768)]
for b, ctx in shapes:
    kb.run_decode(b, ctx, "int4-bdr-b128", c, "whole")
reduce = dec._reduce_kernel
dec._reduce_kernel = {(b, h): lambda *a, **k: None for b, _ in shapes for h in (8,)}
for b, ctx in shapes:
    kb.run_decode(b, ctx, "int4-bdr-b128", c, "no-reduce")
