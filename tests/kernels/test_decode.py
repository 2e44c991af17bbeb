"""Paged decode attention against a float64 reference over the same (dequantized) cache."""

from __future__ import annotations

import pytest
import torch
from kref import DEV, decode_ref, default_scale, empty_cache, make_pages, rand_kv, rel_err

from saw_kernels import DecodeTuning, decode_attention, write_kv
from saw_kernels.decode_int4_warp import pair_counters
from saw_kv.formats import KVFormat, rotate

TOL = 6e-3  # bf16 output rounding (~2e-3) plus fp16 q / P (INT4) or bf16 P pieces; the CPU interpreter
# truncates to bf16 where the GPU rounds: measured there ~3.5e-3, on the H100 ~1.8e-3

# (format, query group, page size, lengths, splits): every Hadamard order, GQA 1/2/4/7/8,
# 1-token requests, page crossings, empty splits, page sizes 1..128.
CASES = [
    (KVFormat("bf16", 64), 1, 4, [1, 37, 20], None),
    (KVFormat("bf16", 128), 8, 16, [50, 3], 3),
    (KVFormat("int4", 64), 2, 1, [9, 1], None),
    (KVFormat("int4", 128, k_center=True), 4, 16, [33, 17], 2),
    (KVFormat("int4-bdr", 128, 16, rotate_v=True, k_center=True), 7, 8, [25, 40], 3),
    (KVFormat("int4-bdr", 64, 32), 4, 4, [1, 37, 20], 1),
    (KVFormat("int4-bdr", 64, 64, rotate_v=True), 1, 128, [130, 5], 2),
    (KVFormat("int4-bdr", 128, 128, rotate_v=True, k_center=True), 8, 16, [1, 70, 33], 4),
    (KVFormat("int4-bdr", 128, 128), 2, 2, [19, 6], 1),
    (KVFormat("int4-bdr", 128, 64, rotate_v=True), 4, 32, [1, 40], 5),
    (KVFormat("int4-bdr", 64, 16, k_center=True), 2, 8, [17, 16, 15], None),
]


# Kernel options against the same references. On a GPU the default INT4 kernel is the warp kernel where
# it fits (pages of 16+ tokens, q plain or already rotated); maxnreg (a ptxas register cap, which the
# interpreter drops) belongs to the tile kernel.
VARIANTS = {"default": {}, "tile-maxnreg128": {"maxnreg": 128, "impl": "tile"}}


def case_id(case: tuple) -> str:
    f, g, ps, lens, splits = case
    return f"{f.name}-d{f.head_dim}-b{f.hadamard_order}{'-rv' if f.rotate_v else ''}{'-kc' if f.k_center else ''}" \
           f"-g{g}-ps{ps}-s{splits}"


def run_decode(fmt: KVFormat, group: int, page_size: int, lens: list[int], splits: int | None, hkv: int = 2,
               seed: int = 0, q_scale: float = 0.5, q_rotated: bool = False, **kw: int | str) -> float:
    """kw: DecodeTuning fields (num_splits is splits)."""
    gen = torch.Generator().manual_seed(seed)
    d = fmt.head_dim
    paged = make_pages(lens, page_size, gen)
    slots = torch.cat([paged.slots(b, torch.arange(n, device=DEV)) for b, n in enumerate(lens)])
    k, v = rand_kv(slots.numel(), hkv, d, gen=gen), rand_kv(slots.numel(), hkv, d, gen=gen)
    k_mean = k.float().mean(0) if fmt.k_center else None
    cache = empty_cache(fmt, paged.num_slots, hkv, page_size, k_mean)
    write_kv(k, v, slots, cache)
    q = (torch.randn(len(lens), hkv * group, d, generator=gen) * q_scale).to(DEV, torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    q_in = rotate(q.double(), fmt.hadamard_order).float() if q_rotated else q  # as write_kv(q=...) returns it
    got = decode_attention(q_in, cache, paged.page_table, seq_lens, default_scale(d), out=out, q_rotated=q_rotated,
                           tuning=DecodeTuning(num_splits=splits, **kw))
    assert got.data_ptr() == out.data_ptr()
    return rel_err(out, decode_ref(q, cache, paged, lens, fmt, default_scale(d)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_matches_reference(case: tuple, variant: str) -> None:
    assert run_decode(*case, **VARIANTS[variant]) < TOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0].rotated], ids=case_id)
def test_decode_takes_rotated_queries(case: tuple, variant: str) -> None:
    """The engine's path for int4-bdr: q comes in rotated (fp32, from the write launch)."""
    assert run_decode(*case, q_rotated=True, **VARIANTS[variant]) < TOL


def test_decode_huge_and_tiny_queries() -> None:
    """q is scaled per row by a power of two before it becomes fp16: rows of 1e4 and 1e-4 are exact too."""
    fmt = KVFormat("int4-bdr", 128, 128, k_center=True)
    for scale in (1e-4, 1e4):
        assert run_decode(fmt, 4, 16, [1, 40, 77], 2, q_scale=scale) < TOL


# (format, Hadamard order, rotate_v, decode_attention options): the defaults (int4-bdr with q rotated, as
# the engine calls it), then the tile kernel and the compiled variants bench/kernels_bench.py sweeps
FULL_SHAPE = [("bf16", 128, False, {}), ("int4", 128, False, {}), ("int4-bdr", 128, False, {"q_rotated": True}),
              ("int4-bdr", 16, True, {"q_rotated": True}), ("int4-bdr", 128, False, {"maxnreg": 128}),
              ("int4", 128, False, {"impl": "tile"}), ("int4-bdr", 128, False, {"num_stages": 5})]


def full_shape_id(p: tuple) -> str:
    name, order, rv, cfg = p
    return f"{name}-b{order}{'-rv' if rv else ''}" + "".join(f"-{k}{v}" for k, v in cfg.items())


@pytest.mark.gpu
@pytest.mark.parametrize("name,order,rv,cfg", FULL_SHAPE, ids=[full_shape_id(p) for p in FULL_SHAPE])
@pytest.mark.parametrize("lens", [[1, 4096, 2000, 777], [16384, 129, 64, 3]])
def test_decode_full_shape(name: str, order: int, rv: bool, cfg: dict, lens: list[int]) -> None:
    fmt = KVFormat(name, 128, order, rv, name != "bf16")
    assert run_decode(fmt, 4, 16, lens, None, hkv=8, seed=1, **cfg) < TOL


# The warp kernel (CUDA only) at its edges: lengths around its 32-token steps and their 16-token halves,
# 1 token, runs that start and end inside pairs and span several, more programs than runs (the last: 240 for
# 6 steps), page sizes 16..128, GQA 1..16, head_dim 64 and 128, every option of the format. Its splits are
# programs per pair.
WARP_CASES = [
    (KVFormat("int4", 128), 4, 16, [1, 15, 16, 17, 31, 32, 33, 300], None),
    (KVFormat("int4-bdr", 128, 128, k_center=True), 8, 32, [4096, 33, 1], 3),
    (KVFormat("int4-bdr", 64, 16, rotate_v=True), 7, 16, [47, 16, 200], 2),
    (KVFormat("int4-bdr", 128, 64, rotate_v=True, k_center=True), 1, 128, [130, 5, 1000], 8),
    (KVFormat("int4", 64, k_center=True), 2, 16, [31, 64], 1),
    (KVFormat("int4-bdr", 128, 16), 16, 16, [100, 17], None),
    (KVFormat("int4-bdr", 128, 32), 3, 64, [1, 2, 3], 40),
    (KVFormat("int4", 128), 4, 16, [9000, 5], None),  # 282 steps in ~57 pieces: MAX_PIECES binds
    (KVFormat("int4-bdr", 64, 64), 2, 16, [1 + 37 * i % 90 for i in range(150)], None),  # 2 passes over lengths
]


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("case", WARP_CASES, ids=case_id)
def test_warp_decode_matches_reference(case: tuple, stages: int) -> None:
    """stages: the kernel's shared buffers (num_stages), stages - 1 steps in flight."""
    assert run_decode(*case, q_rotated=case[0].rotated, impl="warp", num_stages=stages) < TOL
    torch.cuda.synchronize()
    assert not pair_counters(DEV).any(), "the last piece of each pair resets its count"


@pytest.mark.gpu
def test_warp_decode_huge_and_tiny_queries() -> None:
    fmt = KVFormat("int4-bdr", 128, 128, k_center=True)
    for scale in (1e-4, 1e4):
        assert run_decode(fmt, 4, 16, [1, 40, 77], 2, q_scale=scale, q_rotated=True, impl="warp") < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["tile", "warp"])
def test_decode_cuda_graph_replays_new_lengths(impl: str) -> None:
    fmt, d, hkv, group, ps = KVFormat("int4-bdr", 128, 128, True), 128, 8, 4, 16
    lens = [300, 1000]
    gen = torch.Generator().manual_seed(3)
    paged = make_pages([1024, 1024], ps, gen)
    cache = empty_cache(fmt, paged.num_slots, hkv, ps)
    slots = torch.cat([paged.slots(b, torch.arange(1024, device=DEV)) for b in range(2)])
    write_kv(rand_kv(2048, hkv, d, gen=gen), rand_kv(2048, hkv, d, gen=gen), slots, cache)
    q = torch.randn(2, hkv * group, d, device=DEV).bfloat16()
    q_rot = rotate(q.double(), fmt.hadamard_order).float()  # as the engine's write launch returns it
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)

    def step() -> None:
        decode_attention(q_rot, cache, paged.page_table, seq_lens, 0.09, out=out, q_rotated=True,
                         tuning=DecodeTuning(impl=impl))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new in ([5, 1024], [1, 1], [1024, 700]):
        seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, decode_ref(q, cache, paged, new, fmt, 0.09)) < TOL


def test_decode_rejects_a_kernel_that_does_not_fit() -> None:
    """impl='warp' where the warp kernel cannot serve (on CPU, pages of 8, plain q of int4-bdr) is an error,
    not a wrong answer; so is an unknown impl."""
    fmt = KVFormat("int4-bdr", 128, 128)
    for impl, page_size in (("warp", 8), ("warp", 16), ("wrap", 16)):
        with pytest.raises(ValueError, match="impl="):
            run_decode(fmt, 4, page_size, [40], None, impl=impl)
