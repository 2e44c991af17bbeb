"""The bf16 window and sinks in attention: decode and extend over INT4 pages + ring + new tokens, against a
float64 reference in the model's space (INT4 rows dequantized and taken back to raw K, V; ring and new tokens
raw), and write_window."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from kref import (
    DEV,
    Paged,
    attention_ref,
    default_scale,
    empty_cache,
    make_pages,
    rand_kv,
    raw_rows,
)

from saw_kernels import DecodeTuning, ExtendTuning, Ring, decode_attention, extend_attention, write_kv, write_window
from saw_kernels.decode_int4_warp import pair_counters
from saw_kv.cache import LayerCache
from saw_kv.formats import KVFormat, encode_q

DECODE_TOL = 6e-3  # as test_decode.py
EXTEND_TOL = 1.5e-2  # as test_extend.py


@dataclass
class Scenario:
    """Requests with P cached tokens (the ring holding the first sinks and the last lens of them) and `new`
    tokens this step.

    Every token, new ones included, is in the INT4 pages (written by write_kv, as the engine does); k, v hold
    each request's raw rows at rows off[b] + position."""

    fmt: KVFormat
    P: list[int]
    lens: list[int]
    sinks: list[int]
    new: list[int]
    off: list[int]
    k: torch.Tensor
    v: torch.Tensor
    cache: LayerCache  # with the ring tensors
    paged: Paged
    k_mean: torch.Tensor | None
    ring: Ring


def scenario(fmt: KVFormat, page_size: int, P: list[int], lens: list[int], new: list[int], hkv: int,
             gen: torch.Generator) -> Scenario:
    """Sinks held: as many of the format's as fit below the window (min(S, P - lens))."""
    d, w, n_sinks = fmt.head_dim, fmt.window, fmt.sinks
    assert w > 0
    sinks = [min(n_sinks, p - n) for p, n in zip(P, lens, strict=True)]
    total = [p + n for p, n in zip(P, new, strict=True)]
    off = [sum(total[:b]) for b in range(len(total))]
    paged = make_pages(total, page_size, gen)
    k, v = rand_kv(sum(total), hkv, d, gen=gen), rand_kv(sum(total), hkv, d, gen=gen)
    k_mean = k.float().mean(0) if fmt.k_center else None
    cache = empty_cache(fmt, paged.num_slots, hkv, page_size, k_mean)
    slots = torch.cat([paged.slots(b, torch.arange(n, device=DEV)) for b, n in enumerate(total)])
    write_kv(k, v, slots, cache)
    # a spare row, rows out of order; unused slots poisoned with NaN and inf (they must never be read)
    ring_k = torch.full((len(P) + 1, n_sinks + w, hkv, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    ring_k[:, ::3] = float("inf")
    ring_v = ring_k.clone()
    rows = torch.randperm(len(P) + 1, generator=gen)[: len(P)]
    for b, (p, n) in enumerate(zip(P, lens, strict=True)):
        assert n <= min(p, w)
        fill_ring(ring_k, ring_v, int(rows[b]), k, v, off[b], sinks[b], range(p - n, p), n_sinks)
    as_int32 = dict(dtype=torch.int32, device=DEV)
    ring = Ring(rows.to(**as_int32), torch.tensor(lens, **as_int32), torch.tensor(P, **as_int32),
                torch.tensor(sinks, **as_int32) if n_sinks else None)
    cache = replace(cache, ring_k=ring_k, ring_v=ring_v)
    return Scenario(fmt, P, lens, sinks, new, off, k, v, cache, paged, k_mean, ring)


def fill_ring(ring_k: torch.Tensor, ring_v: torch.Tensor, row: int, k: torch.Tensor, v: torch.Tensor, off: int,
              sinks: int, window: range, n_sinks: int) -> None:
    """Row `row` holds positions 0 .. sinks - 1 in its sink slots and `window` in slots S + p % W."""
    w = ring_k.shape[1] - n_sinks
    win = torch.tensor(list(window), dtype=torch.long)
    for slots, pos in ((torch.arange(sinks), torch.arange(sinks)), (n_sinks + win % w, win)):
        ring_k[row, slots] = k[off + pos]
        ring_v[row, slots] = v[off + pos]


def reference(sc: Scenario, q: torch.Tensor, int4_lens: list[int], sm_scale: float) -> torch.Tensor:
    """Query i of request b (position P + i) over positions <= its own: raw sinks, INT4 rows up to int4_lens[b],
    raw after."""
    out, row = [], 0
    for b, (p, n, n4) in enumerate(zip(sc.P, sc.new, int4_lens, strict=True)):
        s = sc.sinks[b]
        keys, values = raw_rows(sc.cache, sc.paged.slots(b, torch.arange(s, n4, device=DEV)), sc.fmt, sc.k_mean)
        sink, raw = slice(sc.off[b], sc.off[b] + s), slice(sc.off[b] + n4, sc.off[b] + p + n)
        keys = torch.cat([sc.k[sink].double(), keys, sc.k[raw].double()])
        values = torch.cat([sc.v[sink].double(), values, sc.v[raw].double()])
        mask = torch.arange(p + n, device=DEV)[None, :] <= p + torch.arange(n, device=DEV)[:, None]
        out.append(attention_ref(q[row:row + n], keys, values, sm_scale, mask))
        row += n
    return torch.cat(out)


def rel_err_finite(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.isfinite().all(), "NaN / inf in the output (a poisoned ring slot or an unwritten row)"
    return ((out.double() - ref).norm() / ref.norm()).item()


def run_decode(fmt: KVFormat, group: int, page_size: int, P: list[int], lens: list[int], splits: int | None,
               hkv: int = 2, seed: int = 0, **kw: str | int) -> float:
    """The engine's decode step: q encoded (write_kv(q=...) returns encode_q), INT4 length P - lens."""
    gen = torch.Generator().manual_seed(seed)
    d = fmt.head_dim
    sc = scenario(fmt, page_size, P, lens, [1] * len(P), hkv, gen)
    q = (torch.randn(len(P), hkv * group, d, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    int4_lens = [p - n for p, n in zip(P, lens, strict=True)]
    new = torch.stack([sc.k[[o + p for o, p in zip(sc.off, P, strict=True)]],
                       sc.v[[o + p for o, p in zip(sc.off, P, strict=True)]]], 1)  # strided k_new, v_new views
    out = torch.full_like(q, float("nan"))
    # the launch also keeps each new token in its window slot, as the engine asks
    ring_k, ring_v = sc.cache.ring_k, sc.cache.ring_v
    keep = (sc.ring.rows.long() * ring_k.shape[1] + fmt.sinks + torch.tensor(P, device=DEV) % fmt.window)
    ring_before = ring_k.clone(), ring_v.clone()
    decode_attention(encode_q(q, fmt), sc.cache, sc.paged.page_table,
                     torch.tensor(int4_lens, dtype=torch.int32, device=DEV), default_scale(d), out=out,
                     q_rotated=fmt.rotated, ring=sc.ring, q_plain=q, k_new=new[:, 0], v_new=new[:, 1],
                     keep_slots=keep, tuning=DecodeTuning(num_splits=splits, **kw))
    for ring, before, x in zip((ring_k, ring_v), ring_before, (new[:, 0], new[:, 1]), strict=True):
        flat, flat_before = ring.view(-1, *ring.shape[2:]), before.view(-1, *ring.shape[2:])
        assert torch.equal(flat[keep], x)
        flat_before[keep] = x
        assert torch.equal(flat.isnan(), flat_before.isnan())
        assert torch.equal(flat.nan_to_num(), flat_before.nan_to_num())
    return rel_err_finite(out, reference(sc, q, int4_lens, default_scale(d)))


def run_extend(fmt: KVFormat, group: int, page_size: int, P: list[int], lens: list[int], new: list[int],
               hkv: int = 2, seed: int = 0, **kw: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    d = fmt.head_dim
    sc = scenario(fmt, page_size, P, lens, new, hkv, gen)
    q = (torch.randn(sum(new), hkv * group, d, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    rows = torch.cat([torch.arange(o + p, o + p + n) for o, p, n in zip(sc.off, P, new, strict=True)])
    int4_lens = [p - n for p, n in zip(P, lens, strict=True)]
    cu = torch.tensor([0] + [sum(new[:b + 1]) for b in range(len(new))], dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    extend_attention(q, sc.k[rows], sc.v[rows], cu, torch.tensor(int4_lens, dtype=torch.int32, device=DEV),
                     sc.cache, sc.paged.page_table, default_scale(d), ring=sc.ring, out=out,
                     max_prefix_len=max(int4_lens), tuning=ExtendTuning(**kw))
    return rel_err_finite(out, reference(sc, q, int4_lens, default_scale(d)))


def fmt_id(f: KVFormat) -> str:
    return f.describe().replace(":", "-").replace("+", "-") + f"-d{f.head_dim}"


# (format, query group, page size, P, ring lens, splits). Requests: 1 token (P = 0), the ring alone (INT4
# length 0), lens 0 (a prefix-cache hit, or sinks alone), lens < W with a wrapped ring, lens = W with P - lens
# not a multiple of W, INT4 lengths across pages, some sinks held (P - lens < S); W 1, 16, 32, 64; S 0, 1, 4, 5.
DECODE_CASES = [
    (KVFormat("int4", 64, k_center=True, window=16, sinks=4), 2, 16, [0, 1, 5, 40, 23, 16, 6], [0, 1, 0, 16, 9, 16, 3],
     None),
    (KVFormat("int4-bdr", 128, 64, rotate_v=True, k_center=True, window=32), 4, 16, [70, 33, 31], [32, 20, 31], 3),
    (KVFormat("int4-bdr", 64, 16, window=1, sinks=1), 8, 32, [50, 1, 17], [1, 1, 0], 1),
    (KVFormat("int4-bdr", 128, 128, rotate_v=True, k_center=True, window=64, sinks=5), 1, 64, [100, 64], [64, 50], 2),
    (KVFormat("int4", 128, window=16), 7, 16, [20, 3], [16, 3], None),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: fmt_id(c[0]) + f"-g{c[1]}-ps{c[2]}")
def test_decode_window(case: tuple) -> None:
    assert run_decode(*case) < DECODE_TOL


# (format, query group, page size, P, ring lens, new): a first chunk (P = 0) next to prefixed requests, INT4
# length 0, wrapped rings, lens = W, 1-token steps.
EXTEND_CASES = [
    (KVFormat("int4", 64, k_center=True, window=16, sinks=4), 2, 16, [0, 20, 7, 33, 6], [0, 16, 7, 10, 4],
     [5, 3, 1, 17, 2]),
    (KVFormat("int4-bdr", 128, 64, rotate_v=True, k_center=True, window=32), 4, 32, [45, 31], [32, 31], [2, 18]),
    (KVFormat("int4-bdr", 64, 16, window=1, sinks=1), 8, 16, [9, 1], [1, 1], [4, 1]),
    (KVFormat("int4-bdr", 128, 128, rotate_v=True, k_center=True, window=64), 1, 64, [70], [40], [20]),
]


@pytest.mark.parametrize("case", EXTEND_CASES, ids=lambda c: fmt_id(c[0]) + f"-g{c[1]}-ps{c[2]}")
def test_extend_window(case: tuple) -> None:
    assert run_extend(*case) < EXTEND_TOL


def test_write_window() -> None:
    """Slots of several rows, tokens sharing a dump slot, v a strided slice of a fused qkv row."""
    hkv, d, w, t = 2, 64, 16, 9
    gen = torch.Generator().manual_seed(4)
    qkv = rand_kv(t, 3 * hkv, d, gen=gen)  # q | k | v heads of one fused row
    k, v = qkv[:, hkv:2 * hkv].contiguous(), qkv[:, 2 * hkv:]
    ring_k = torch.full((4, w, hkv, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    ring_v = ring_k.clone()
    dump = 3 * w  # slot 0 of spare row 3
    slots = torch.tensor([5, 6, 7, w + 15, dump, 2 * w, dump, w + 1, dump], dtype=torch.int64, device=DEV)
    write_window(k, v, slots, ring_k, ring_v)
    keep = slots != dump
    for ring, x in ((ring_k, k), (ring_v, v)):
        flat = ring.view(-1, hkv, d)
        assert torch.equal(flat[slots[keep]], x[keep])
        assert any(torch.equal(flat[dump], x[i]) for i in torch.nonzero(~keep).flatten().tolist())
        untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEV)
        untouched[slots] = False
        assert flat[untouched].isnan().all()


# GPU: the warp kernel (its combine adds the window's partial; with rotate_v the reduce does) at page sizes
# 16..64, GQA 1..8, and full shapes with the engine's default options as the kernels see them (k_center,
# window 16, 4 sinks; the K scale is applied to q and k before these kernels).
WARP_CASES = [c for c in DECODE_CASES if c[2] >= 16]
DEFAULT_FMTS = [KVFormat("int4-bdr", 128, 128, k_center=True, window=16, sinks=4),
                KVFormat("int4", 128, k_center=True, window=16, sinks=4)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", WARP_CASES, ids=lambda c: fmt_id(c[0]) + f"-g{c[1]}-ps{c[2]}")
def test_warp_decode_window(case: tuple) -> None:
    assert run_decode(*case, impl="warp") < DECODE_TOL
    torch.cuda.synchronize()
    assert not pair_counters(DEV).any()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", DEFAULT_FMTS, ids=fmt_id)
@pytest.mark.parametrize("impl", ["tile", "warp"])
def test_decode_window_full_shape(fmt: KVFormat, impl: str) -> None:
    assert run_decode(fmt, 4, 16, [4096, 2000, 31, 777], [16, 16, 14, 5], None, hkv=8, seed=1, impl=impl) \
        < DECODE_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", DEFAULT_FMTS, ids=fmt_id)
def test_extend_window_full_shape(fmt: KVFormat) -> None:
    assert run_extend(fmt, 4, 16, [1000, 513, 0, 40], [16, 16, 0, 14], [300, 77, 129, 1], hkv=8, seed=1) \
        < EXTEND_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["tile", "warp"])
def test_decode_window_cuda_graph_replays_new_lengths(impl: str) -> None:
    """Captured once, replayed with other INT4 lengths, ring lengths, sinks held and ring ends."""
    fmt, hkv, group, ps = DEFAULT_FMTS[0], 8, 4, 16
    gen = torch.Generator().manual_seed(3)
    sc = scenario(fmt, ps, [1024, 1024], [16, 16], [1, 1], hkv, gen)
    assert sc.ring.sinks is not None
    q = (torch.randn(2, hkv * group, 128, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    q_enc = encode_q(q, fmt)
    k_new = torch.empty(2, hkv, 128, dtype=torch.bfloat16, device=DEV)
    v_new = torch.empty_like(k_new)
    seq_lens = torch.zeros(2, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)

    def step() -> None:
        decode_attention(q_enc, sc.cache, sc.paged.page_table, seq_lens, 0.09, out=out, q_rotated=True,
                         ring=sc.ring, q_plain=q, k_new=k_new, v_new=v_new, tuning=DecodeTuning(impl=impl))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for P, lens, sinks in (([40, 1023], [16, 7], [4, 4]), ([1, 20], [0, 16], [1, 4]), ([1000, 500], [0, 15], [0, 2])):
        sc.P[:], sc.lens[:], sc.sinks[:] = P, lens, sinks
        # the ring and the new tokens of the new P, lens, from the scenario's rows (all 1025 positions are in the pages)
        for b, (p, n) in enumerate(zip(P, lens, strict=True)):
            fill_ring(sc.cache.ring_k, sc.cache.ring_v, int(sc.ring.rows[b]), sc.k, sc.v, sc.off[b], sinks[b],
                      range(p - n, p), fmt.sinks)
            k_new[b], v_new[b] = sc.k[sc.off[b] + p], sc.v[sc.off[b] + p]
        sc.ring.lens.copy_(torch.tensor(lens, dtype=torch.int32))
        sc.ring.ends.copy_(torch.tensor(P, dtype=torch.int32))
        sc.ring.sinks.copy_(torch.tensor(sinks, dtype=torch.int32))
        int4_lens = [p - n for p, n in zip(P, lens, strict=True)]
        seq_lens.copy_(torch.tensor(int4_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err_finite(out, reference(sc, q, int4_lens, 0.09)) < DECODE_TOL
