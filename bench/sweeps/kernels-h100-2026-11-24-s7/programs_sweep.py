"""The stream-K warp kernel's time at 64 x 4k (int4-bdr) against its program count (equal runs end
together only if all are resident); with --no-reduce, the decode kernel alone (the reduce launch skipped)."""
import sys

sys.path.insert(0, "bench")
import kernels_bench as kb  # noqa: E402

import saw_kernels.decode as dec  # noqa: E402
import saw_kernels.decode_int4_warp as w  # noqa: E402

c = kb.copy_gbps(2 << 30)
print(f"copy {c:.0f} GB/s")
if "--no-reduce" in sys.argv:
    dec._reduce_kernel = {(64, 8): lambda *a, **k: None}
for n in [int(a) for a in sys.argv[1:] if a.isdigit()]:
    dec.warp_programs = lambda *a, n=n: n
    kb.run_decode(64, 4096, "int4-bdr-b128", c)
    print(f"  programs {n}", flush=True)
for cache in w.decode_int4_warp_kernel.device_caches.values():
    for k in cache[0].values():
        print("n_regs", k.n_regs, "shared", k.metadata.shared)
