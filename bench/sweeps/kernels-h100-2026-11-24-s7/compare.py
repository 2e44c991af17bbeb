"""The default INT4 decode at the issue's three shapes and the latency shapes, for whichever tree is first
on PYTHONPATH (the stream-K warp kernel, or the split warp kernel of 786da6f), bf16 alongside; with
--sweep, program counts of the warp kernel (num_splits = programs per (request, KV head))."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
for b, ctx in [(64, 4096), (16, 16384), (128, 2048)]:
    for kv in ("bf16", "int4", "int4-bdr-b128"):
        kb.run_decode(b, ctx, kv, c)
    for s in (1, 2, 3, 4, 6) if "--sweep" in sys.argv else ():
        kb.run_decode(b, ctx, "int4-bdr-b128", c, cfg=dict(impl="warp", num_splits=s))
for b, ctx in [(1, 1024), (1, 32768), (8, 1024), (8, 32768)]:
    kb.run_decode(b, ctx, "int4-bdr-b128", c, "decode-latency")
