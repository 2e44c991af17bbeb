"""The native CPU decode kernel (CpuBackend) against its spec, the torch reference (ReferenceBackend): the same pool
contents and step, fresh random inputs with outlier channels; the output, the stored rows and the ring must agree.
INT4 codes are compared exactly where both sides compute the same fp32 numbers (no rotation) and up to rare
one-step flips where the rotation's sums are ordered differently."""

from __future__ import annotations

import pytest
import torch
from engine_util import decode_batch

from saw_kv.formats import KVFormat
from saw_worker.kv.cpu_backend import CpuBackend, native_available
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference_backend import ReferenceBackend

pytestmark = pytest.mark.skipif(not native_available(), reason="saw_router._native is not built")

# (kv, head_dim, Hkv, group, page_size, modifiers)
CASES = [
    ("bf16", 64, 2, 1, 16, {}),
    ("bf16", 128, 1, 8, 4, {}),
    ("int4", 64, 2, 3, 16, {}),
    ("int4", 128, 2, 4, 16, {"k_center": True}),
    ("int4-bdr", 64, 3, 3, 16, {"hadamard_order": 32, "k_center": True}),
    ("int4-bdr", 128, 2, 2, 16, {"hadamard_order": 128, "rotate_v": True}),
    ("int4-bdr", 64, 1, 7, 4, {"hadamard_order": 16}),
    ("int4-bdr", 64, 3, 3, 16, {"hadamard_order": 32, "k_center": True, "window": 16, "sinks": 4}),
    ("int4-bdr", 128, 2, 5, 4, {"hadamard_order": 64, "window": 4, "sinks": 2, "rotate_v": True}),
    ("int4", 64, 2, 2, 4, {"window": 3}),
]
# tokens each request holds before the step: the first token, page boundaries, a longer one
LENGTHS = [[0], [3, 4, 5], [15, 16, 17, 1], [100, 2, 31]]


def fill_randomly(pool: KVPool, gen: torch.Generator) -> None:
    """Every page and ring row as some earlier steps could have left it (outlier channels in bf16 K)."""
    for k, v, kp, vp in pool._tensors.values():  # noqa: SLF001
        for t in (k, v):
            if t.dtype == torch.uint8:
                t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 2)
                t[..., :3] = t[..., :3] * 5 + 8
        for p in (kp, vp):
            if p is not None:
                p[..., 0] = torch.rand(p.shape[:-1], generator=gen) * 0.5 + 0.01
                p[..., 1] = torch.randn(p.shape[:-1], generator=gen)
    if pool._ring is not None:  # noqa: SLF001
        for ring in pool._ring:  # noqa: SLF001
            ring.copy_(torch.randn(ring.shape, generator=gen))


def new_qkv(batch: int, hq: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k contiguous and v a strided view into one fused output, as the model hands them over."""
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, generator=gen)
    qkv[:, hq * d:(hq + hkv) * d].view(batch, hkv, d)[..., :2] += 12  # K outlier channels
    qkv = qkv.to(dtype)
    q = qkv[:, : hq * d].reshape(batch, hq, d).contiguous()
    k = qkv[:, hq * d:(hq + hkv) * d].reshape(batch, hkv, d).contiguous()
    return q, k, qkv[:, (hq + hkv) * d:].view(batch, hkv, d)


def snapshot(pool: KVPool) -> list[torch.Tensor]:
    tensors = [t for group in pool._tensors.values() for t in group if t is not None]  # noqa: SLF001
    return tensors + list(pool._ring or ())  # noqa: SLF001


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv,d,hkv,group,page_size,mods", CASES)
def test_native_decode_matches_the_reference(kv: str, d: int, hkv: int, group: int, page_size: int, mods: dict,
                                             dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hash((kv, d, hkv, group, str(mods))) % 2**31)
    fmt = KVFormat.make(kv, d, **mods)
    for lengths in LENGTHS:
        pool = KVPool(fmt, 1, hkv, num_pages=64, page_size=page_size, device=torch.device("cpu"), window_rows=6)
        if fmt.k_center:
            pool.k_mean = torch.randn(1, hkv, d, generator=gen)
        fill_randomly(pool, gen)
        backends = (ReferenceBackend(pool, d ** -0.5), CpuBackend(pool, d ** -0.5))
        h = decode_batch(pool, lengths, [max(0, n - 20) for n in lengths])
        q, k, v = new_qkv(len(lengths), hkv * group, hkv, d, dtype, gen)
        before = [t.clone() for t in snapshot(pool)]
        results = []
        for backend in backends:
            for t, saved in zip(snapshot(pool), before, strict=True):
                t.copy_(saved)
            backend.prepare(h)
            out = backend(0, q, k, v)
            results.append((out.float(), [t.clone() for t in snapshot(pool)]))
        (ref, ref_state), (got, got_state) = results
        assert got.dtype == ref.dtype and not got.isnan().any()
        tol = 0.03 * ref.abs().max().item() + 0.02
        assert (got - ref).abs().max().item() <= tol, f"{lengths}: {(got - ref).abs().max().item()} > {tol}"
        for want, have in zip(ref_state, got_state, strict=True):
            if want.dtype == torch.uint8:
                flips = torch.cat([((want & 0xF).int() - (have & 0xF).int()).flatten(),
                                   ((want >> 4).int() - (have >> 4).int()).flatten()])
                assert flips.abs().max() <= 1 and (flips != 0).float().mean() < (0.002 if fmt.rotated else 1e-9)
            elif want.dtype == torch.float16:
                torch.testing.assert_close(have, want, atol=0, rtol=2e-3 if fmt.rotated else 0)
            else:
                assert torch.equal(have, want), "bf16 rows and rings are stored exactly"


def test_padding_rows_write_nothing_and_bad_layouts_are_errors() -> None:
    fmt = KVFormat.make("int4-bdr", 64, hadamard_order=32)
    pool = KVPool(fmt, 1, 2, num_pages=16, page_size=16, device=torch.device("cpu"))
    backend = CpuBackend(pool, 0.125)
    h = decode_batch(pool, [5, 9])
    h.slots[0] = -1  # a padded row
    backend.prepare(h)
    q, k, v = new_qkv(2, 4, 2, 64, torch.bfloat16, torch.Generator().manual_seed(0))
    before = pool.layer(0).k.clone()
    backend(0, q, k, v)
    changed = (pool.layer(0).k != before).any(-1).any(-1).nonzero().flatten().tolist()
    assert changed == [h.slots[1]]
    lay = backend.layout
    assert lay is not None
    lay.page_table[1, 0] = 10_000  # a page outside the pool
    with pytest.raises(ValueError, match="outside"):
        CpuBackend(pool, 0.125).forward_decode(q, k, v, pool.layer(0), lay)
