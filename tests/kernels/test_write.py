"""Fused write kernel against formats.py: packed bytes and (scale, lo) per row."""

from __future__ import annotations

import zlib

import pytest
import torch
from kref import DEV, empty_cache, rand_kv

from saw_kernels import write_kv
from saw_kernels._common import half_hadamard
from saw_kernels.write import mean_pieces
from saw_kv.formats import HADAMARD_ORDERS, KVFormat, encode_k, encode_v, quantize_int4, rotate

TIE = 2e-3  # |frac((x - lo) / scale) - 0.5| below this: rounding may go either way for rotated rows
TIE_EXACT = 1e-5  # unrotated rows: only the reciprocal's ~2 ulp separate kernel and reference


def all_formats(d: int) -> list[KVFormat]:
    fmts = [KVFormat("bf16", d), KVFormat("int4", d), KVFormat("int4", d, k_center=True)]
    for order in HADAMARD_ORDERS:
        if order <= d:
            for rv in (False, True):
                for kc in (False, True):
                    fmts.append(KVFormat("int4-bdr", d, order, rv, kc))
    return fmts


FORMATS = all_formats(64) + all_formats(128)


def fmt_id(f: KVFormat) -> str:
    return f"{f.name}-d{f.head_dim}-b{f.hadamard_order}{'-rv' if f.rotate_v else ''}{'-kc' if f.k_center else ''}"


def check_rows(x64: torch.Tensor, ref_x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, exact: bool) -> None:
    """Kernel rows vs quantize_int4 of the fp32 reference: codes may differ by one only at rounding ties."""
    ref_packed, ref_params = quantize_int4(ref_x)
    if exact:  # unrotated: same fp32 ops as the reference up to the reciprocal (ties within ~2 ulp)
        assert torch.equal(params, ref_params)
    else:
        torch.testing.assert_close(params.float(), ref_params.float(), rtol=2e-3, atol=1e-6)
    s, m = params.double().unbind(-1)
    u = (x64 - m[..., None]) / s[..., None]
    want = torch.clamp(torch.round(u), 0, 15)
    codes = torch.cat([packed & 0xF, packed >> 4], -1).double()
    off = codes != want
    near_tie = ((u - torch.floor(u)) - 0.5).abs() < (TIE_EXACT if exact else TIE)
    assert not (off & ~near_tie).any(), f"{int((off & ~near_tie).sum())} codes differ away from a rounding tie"
    assert (codes - want).abs().max() <= 1
    assert int((packed != ref_packed).sum()) <= max(2, packed.numel() // 200)  # ties are rare


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("t", [1, 37])
def test_write_matches_reference(fmt: KVFormat, t: int) -> None:
    gen = torch.Generator().manual_seed(t * 1000 + zlib.crc32(fmt_id(fmt).encode()) % 1000)
    hkv, d, num_slots = 3, fmt.head_dim, 64
    k, v = rand_kv(t, hkv, d, gen=gen), rand_kv(t, hkv, d, gen=gen)
    slots = torch.randperm(num_slots, generator=gen)[:t]
    if t > 1:
        slots[torch.randperm(t, generator=gen)[: t // 5]] = -1  # padding rows are skipped
    slots = slots.to(DEV)
    k_mean = (torch.randn(hkv, d, generator=gen) * 3).to(DEV) if fmt.k_center else None
    cache = empty_cache(fmt, num_slots, hkv, 16, k_mean)
    q = rand_kv(t, 2 * hkv, d, gen=gen)
    q_att = write_kv(k, v, slots, cache, q)
    if fmt.rotated:  # every row, padding included: R q in fp32 for the decode kernel
        torch.testing.assert_close(q_att.double(), rotate(q.double(), fmt.hadamard_order), rtol=1e-5, atol=1e-5)
    else:
        assert q_att is q

    keep = slots >= 0
    s = slots[keep]
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEV)
    untouched[s] = False
    if not fmt.quantized:
        assert torch.equal(cache.k[s], k[keep]) and torch.equal(cache.v[s], v[keep])
        assert cache.k[untouched].isnan().all() and cache.v[untouched].isnan().all()
        return
    assert (cache.k[untouched] == 0xFF).all() and cache.k_params[untouched].isnan().all()
    assert (cache.v[untouched] == 0xFF).all() and cache.v_params[untouched].isnan().all()
    kk, vv = k[keep], v[keep]
    xk = kk.double() - (k_mean.double() if k_mean is not None else 0.0)
    xk = rotate(xk, fmt.hadamard_order) if fmt.rotated else xk
    xv = rotate(vv.double(), fmt.hadamard_order) if fmt.rotate_v else vv.double()
    check_rows(xk, encode_k(kk, fmt, k_mean), cache.k[s], cache.k_params[s], exact=not fmt.rotated)
    check_rows(xv, encode_v(vv, fmt), cache.v[s], cache.v_params[s], exact=not fmt.rotate_v)


def test_write_empty_batch() -> None:
    fmt = KVFormat("int4-bdr", 64, 64)
    cache = empty_cache(fmt, 8, 2, 16)
    z = torch.empty(0, 2, 64, dtype=torch.bfloat16, device=DEV)
    write_kv(z, z, torch.empty(0, dtype=torch.int64, device=DEV), cache)
    assert (cache.k == 0xFF).all()


def test_write_sees_an_updated_k_mean() -> None:
    """The rotated mean is cached per k_mean version: an in-place update (calibration) must show, in the tensor
    built before it (a CUDA graph captured then reads that one)."""
    fmt = KVFormat("int4-bdr", 64, 32, k_center=True)
    gen = torch.Generator().manual_seed(5)
    k, v = rand_kv(4, 2, 64, gen=gen), rand_kv(4, 2, 64, gen=gen)
    slots = torch.arange(4, device=DEV)
    k_mean = torch.zeros(2, 64, device=DEV)
    cache = empty_cache(fmt, 8, 2, 16, k_mean)
    write_kv(k, v, slots, cache)
    before = mean_pieces(k_mean, fmt.hadamard_order)
    k_mean.add_((torch.randn(2, 64, generator=gen) * 3).to(DEV))
    write_kv(k, v, slots, cache)
    after = mean_pieces(k_mean, fmt.hadamard_order)
    assert after is before and after.data_ptr() == before.data_ptr()
    _, ref_params = quantize_int4(encode_k(k, fmt, k_mean))
    torch.testing.assert_close(cache.k_params[slots].float(), ref_params.float(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("order", [16, 128])
def test_write_k_center_eight_heads(order: int) -> None:
    """Rotated K centering through mean_pieces with Hkv = 8 (24 piece rows padded to 32) against the reference."""
    fmt = KVFormat("int4-bdr", 128, order, k_center=True)
    gen = torch.Generator().manual_seed(order)
    hkv, t = 8, 6
    k, v = rand_kv(t, hkv, 128, gen=gen), rand_kv(t, hkv, 128, gen=gen)
    k_mean = (torch.randn(hkv, 128, generator=gen) * 3).to(DEV)
    pieces = mean_pieces(k_mean, order)
    m = half_hadamard(128, order, DEV).double()
    want = -torch.cat([k_mean.double()[:, :64] @ m, k_mean.double()[:, 64:] @ m], 1)
    assert pieces.shape == (32, 128) and not pieces[3 * hkv:].any()
    torch.testing.assert_close(pieces[: 3 * hkv].double().view(3, hkv, 128).sum(0), want, rtol=1e-7, atol=1e-6)
    slots = torch.arange(t, device=DEV)
    cache = empty_cache(fmt, t, hkv, 16, k_mean)
    write_kv(k, v, slots, cache)
    xk = rotate(k.double() - k_mean.double(), order)
    check_rows(xk, encode_k(k, fmt, k_mean), cache.k, cache.k_params, exact=False)
    check_rows(v.double(), encode_v(v, fmt), cache.v, cache.v_params, exact=True)
