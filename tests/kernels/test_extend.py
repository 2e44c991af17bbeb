"""Extend attention (new tokens at bf16 + cached prefix from the pages) against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from kref import DEV, default_scale, empty_cache, extend_ref, make_pages, rand_kv, rel_err

from saw_kernels import ExtendTuning, extend_attention, write_kv
from saw_kv.formats import KVFormat

TOL = 1.5e-2  # bf16 q and P on the tensor cores (as flash attention), bf16 output

# (format, query group, page size, prefix lengths, new lengths)
CASES = [
    (KVFormat("bf16", 64), 1, 4, [0, 5], [1, 20]),
    (KVFormat("bf16", 128), 4, 16, [33, 1], [17, 2]),
    (KVFormat("int4", 128), 2, 16, [17, 0, 40], [3, 18, 1]),
    (KVFormat("int4", 64, k_center=True), 4, 8, [33], [21]),
    (KVFormat("int4-bdr", 128, 16, rotate_v=True, k_center=True), 7, 4, [9, 20], [5, 17]),
    (KVFormat("int4-bdr", 64, 32), 8, 1, [6, 3], [2, 9]),
    (KVFormat("int4-bdr", 128, 64, rotate_v=True), 4, 32, [40], [35]),
    (KVFormat("int4-bdr", 128, 128, k_center=True), 2, 16, [1, 18], [16, 1]),
    (KVFormat("int4-bdr", 64, 64, rotate_v=True, k_center=True), 1, 128, [130], [4]),
]

# Phase 2 runs the key tiles before a program's first query unmasked and masks the rest; under the
# interpreter a program has 16 // GP queries and a tile 16 keys, unless the case sets blocks.
# (format, query group, page size, prefix lengths, new lengths, launch options)
CAUSAL_CASES = [
    (KVFormat("bf16", 64), 1, 16, [0], [32], {}),  # new a multiple of the tile, every first query on a boundary
    (KVFormat("bf16", 64), 4, 16, [0, 20], [48, 16], {}),  # 4 queries a program: boundaries at 16 and 32 only
    (KVFormat("bf16", 64), 2, 16, [0, 7], [5, 3], {}),  # new shorter than one tile
    (KVFormat("bf16", 128), 7, 16, [0, 9], [33, 2], {}),  # GP 8: 2 queries a program
    (KVFormat("bf16", 64), 8, 16, [0], [19], {}),
    (KVFormat("bf16", 64), 1, 16, [3, 0], [100, 64], dict(block_m=64)),  # 64 queries a program: 4 masked tiles
    (KVFormat("bf16", 64), 2, 16, [0], [70], dict(block_n=32)),  # first queries inside a 32-key tile
    (KVFormat("int4-bdr", 128, 128, k_center=True), 4, 16, [16, 0, 5], [40, 3, 17], {}),  # ragged: idle programs
    # no prefix in the batch (a prompt's first chunk): the kernel without the prefix phase, for a rotated format,
    # and the one with it (max_prefix_len unknown)
    (KVFormat("int4-bdr", 128, 64, rotate_v=True, k_center=True), 4, 16, [0, 0], [40, 3], {}),
    (KVFormat("int4-bdr", 128, 64, rotate_v=True, k_center=True), 4, 16, [0, 0], [40, 3], dict(max_prefix_len=None)),
]


def case_id(case: tuple) -> str:
    f, g, ps, pre, new = case
    return f"{f.name}-d{f.head_dim}-b{f.hadamard_order}{'-rv' if f.rotate_v else ''}{'-kc' if f.k_center else ''}" \
           f"-g{g}-ps{ps}-p{'_'.join(map(str, pre))}-n{'_'.join(map(str, new))}"


def run_extend(fmt: KVFormat, group: int, page_size: int, prefix: list[int], new: list[int], hkv: int = 2,
               seed: int = 0, **kw: int | None) -> float:
    """Relative error of extend_attention against the float64 reference; max_prefix_len is passed as the
    engine does unless kw sets it; the rest of kw are ExtendTuning fields."""
    gen = torch.Generator().manual_seed(seed)
    d = fmt.head_dim
    total = [p + n for p, n in zip(prefix, new, strict=True)]
    paged = make_pages(total, page_size, gen)
    k_mean = (torch.randn(hkv, d, generator=gen) * 3).to(DEV) if fmt.k_center else None
    cache = empty_cache(fmt, paged.num_slots, hkv, page_size, k_mean)
    if sum(prefix):
        slots = torch.cat([paged.slots(b, torch.arange(p, device=DEV)) for b, p in enumerate(prefix)])
        write_kv(rand_kv(slots.numel(), hkv, d, gen=gen), rand_kv(slots.numel(), hkv, d, gen=gen), slots, cache)
    tn = sum(new)
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    q = (torch.randn(tn, hkv * group, d, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    k, v = rand_kv(tn, hkv, d, gen=gen), rand_kv(tn, hkv, d, gen=gen)
    out = torch.full_like(q, float("nan"))
    max_prefix_len = kw.pop("max_prefix_len", max(prefix))
    extend_attention(q, k, v, torch.tensor(cu, dtype=torch.int32, device=DEV),
                     torch.tensor(prefix, dtype=torch.int32, device=DEV), cache, paged.page_table, default_scale(d),
                     out=out, max_prefix_len=max_prefix_len, tuning=ExtendTuning(**kw))
    return rel_err(out, extend_ref(q, k, v, cu, prefix, cache, paged, fmt, default_scale(d), k_mean))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_extend_matches_reference(case: tuple) -> None:
    assert run_extend(*case) < TOL


@pytest.mark.parametrize("case", CAUSAL_CASES,
                         ids=lambda c: case_id(c[:5]) + "".join(f"-{k}{v}" for k, v in c[5].items()))
def test_extend_causal_tiles(case: tuple) -> None:
    *args, kw = case
    assert run_extend(*args, **kw) < TOL


@pytest.mark.parametrize("case", [c for c in CASES if c[0].quantized], ids=case_id)
def test_extend_dequantized_values(case: tuple) -> None:
    """deq=4: the prefix tiles become bf16 values s c + lo, attended as a bf16 cache."""
    assert run_extend(*case, deq=4) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("name,order,rv", [("bf16", 128, False), ("int4", 128, False), ("int4-bdr", 128, True),
                                           ("int4-bdr", 32, False)])
@pytest.mark.parametrize("deq", [0, 3, 4])
def test_extend_full_shape(name: str, order: int, rv: bool, deq: int) -> None:
    fmt = KVFormat(name, 128, order, rv, name != "bf16")
    assert run_extend(fmt, 4, 16, [1000, 513, 0], [300, 77, 129], hkv=8, seed=1, deq=deq) < TOL


@pytest.mark.gpu
def test_extend_gqa7_full_shape() -> None:
    assert run_extend(KVFormat("int4-bdr", 128, 64, False, True), 7, 16, [700, 64], [200, 333], hkv=4, seed=2) < TOL
