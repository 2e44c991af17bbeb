import sys, time, torch
sys.path.insert(0, "python")
from saw_worker.kv import cpu_int4
from saw_worker.kv.reference import TORCH_INT4
C = cpu_int4.products()
def t(f, n=500):
    for _ in range(20): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e6
for L in (100, 1000):
    codes = torch.randint(0, 256, (143680, 3, 32), dtype=torch.uint8)
    params = torch.rand(143680, 3, 2).half()
    slots = torch.randint(0, 143680, (1, L))
    q = torch.randn(1, 3, 3, 64); p = torch.softmax(torch.randn(1, 3, 3, L), -1)
    for name, P in (("torch", TORCH_INT4), ("cpp", C)):
        print(L, name, "scores %.1f us" % t(lambda: P.scores(q, codes, params, slots)), "weighted %.1f us" % t(lambda: P.weighted(p, codes, params, slots)))
