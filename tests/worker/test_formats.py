"""KV formats against float64 math: packing, quantization error, rotation, paged attention."""

from __future__ import annotations

import math

import pytest
import torch

from saw_kv.formats import (
    DEFAULT_SINKS,
    DEFAULT_WINDOW,
    KVDefaults,
    KVFormat,
    decode_o,
    default_kv_options,
    dequantize_int4,
    encode_k,
    encode_q,
    encode_v,
    hadamard_matrix,
    quantize_int4,
    rotate,
)
from saw_worker.kv.pool import KVPool
from saw_worker.kv.reference import paged_attention_ref, write_kv_ref


def outlier_rows(n: int, d: int, seed: int, channels: int = 2, size: float = 40.0) -> torch.Tensor:
    """Gaussian rows plus a few channels with a large constant component, as Qwen-style K has."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    idx = torch.randperm(d, generator=g)[:channels]
    x[:, idx] += size
    return x


def test_packing_layout_matches_spec() -> None:
    x = torch.arange(16, dtype=torch.float32)[None]  # lo 0, scale 1: q == x
    packed, params = quantize_int4(x)
    assert params.tolist() == [[1.0, 0.0]]
    for j in range(8):
        assert packed[0, j] == j | ((j + 8) << 4)  # low nibble element j, high nibble element j + D/2


@pytest.mark.parametrize("d", [64, 128])
def test_int4_roundtrip_error_is_within_half_a_step(d: int) -> None:
    x = outlier_rows(257, d, seed=d).float()
    packed, params = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (257, d // 2)
    err = (dequantize_int4(packed, params).double() - x.double()).abs()
    scale = params[:, 0].double()[:, None]
    # Half a step from rounding, plus the fp16 rounding of lo (what is stored).
    assert bool((err <= scale * 0.5 + params[:, 1].double().abs()[:, None] * 2**-11 + 1e-6).all())


@pytest.mark.parametrize("order", [16, 32, 64, 128])
def test_rotation_is_orthogonal_and_self_inverse(order: int) -> None:
    h = hadamard_matrix(order, torch.float64)
    eye = torch.eye(order, dtype=torch.float64)
    assert torch.allclose(h @ h.T, eye, atol=1e-12) and torch.allclose(h, h.T)
    x = torch.randn(5, 128, dtype=torch.float64)
    assert torch.allclose(rotate(rotate(x, order), order), x, atol=1e-12)
    assert torch.allclose(rotate(x, order).norm(dim=-1), x.norm(dim=-1))


def test_bdr_reconstruction_beats_plain_int4_on_outlier_keys() -> None:
    k = outlier_rows(512, 128, seed=3, channels=3, size=30.0).float()
    errors = {}
    for name in ("int4", "int4-bdr"):
        fmt = KVFormat.make(name, 128)
        x = encode_k(k, fmt)
        rec = dequantize_int4(*quantize_int4(x))
        back = rotate(rec, fmt.hadamard_order) if fmt.rotated else rec
        errors[name] = (back - k).pow(2).mean().item()
    assert errors["int4-bdr"] < 0.5 * errors["int4"], errors


def test_format_validation_messages() -> None:
    with pytest.raises(ValueError, match="unknown KV format"):
        KVFormat.make("fp8", 64)
    with pytest.raises(ValueError, match="--rotate-v needs"):
        KVFormat.make("int4", 64, rotate_v=True)
    assert KVFormat.make("int4-bdr", 64, hadamard_order=128).hadamard_order == 64  # capped at head_dim
    assert KVFormat.make("int4", 128).bytes_per_token_head() * 3.76 == pytest.approx(
        KVFormat.make("bf16", 128).bytes_per_token_head(), rel=0.01)


def test_bf16_layers_cost_bf16_bytes_and_are_checked() -> None:
    from saw_worker.kv.pool import bytes_per_token

    int4 = KVFormat.make("int4", 64)
    assert bytes_per_token(int4, 24, 2, frozenset({0, 1})) == (22 * 72 + 2 * 256) * 2
    with pytest.raises(ValueError, match="outside the model's 24 layers"):
        bytes_per_token(int4, 24, 2, frozenset({24}))


def test_worker_defaults_follow_the_accuracy_measurements() -> None:
    """Unless told otherwise: K centering, K scale, a bf16 window and sinks for INT4 formats; order 128 at
    head_dim 128, 32 at 64."""
    from saw_worker.builder import kv_format
    from saw_worker.cli import options_from_argv

    assert default_kv_options("int4-bdr", 128) == KVDefaults(128, True, True, DEFAULT_WINDOW, DEFAULT_SINKS)
    assert default_kv_options("int4", 64) == KVDefaults(32, True, True, DEFAULT_WINDOW, DEFAULT_SINKS)
    assert default_kv_options("bf16", 64) == KVDefaults(32, False, False, 0, 0)
    kv = options_from_argv([], {}).kv
    assert (kv.name, kv.hadamard_order, kv.k_center, kv.k_scale, kv.window, kv.sinks) == (
        "int4-bdr", None, None, None, None, None)  # resolved per model
    assert kv_format(kv, 64).describe() == f"int4-bdr:b32+center+scale+s{DEFAULT_SINKS}+w{DEFAULT_WINDOW}"
    assert kv_format(options_from_argv(["--kv", "bf16"], {}).kv, 64).describe() == "bf16"
    kv = options_from_argv(["--no-k-center", "--no-k-scale", "--window", "0", "--sinks", "0"],
                           {"HADAMARD_ORDER": "64"}).kv
    assert (kv.hadamard_order, kv.k_center, kv.k_scale, kv.window, kv.sinks) == (64, False, False, 0, 0)
    assert kv_format(kv, 64).describe() == "int4-bdr:b64"
    with pytest.raises(ValueError, match="--window"):
        KVFormat.make("bf16", 64, window=8)
    with pytest.raises(ValueError, match="--sinks needs"):
        KVFormat.make("int4", 64, sinks=4)


def naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 softmax attention of q [Hq, D] over keys/values [L, Hkv, D]."""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), k) * scale, -1)
    return torch.einsum("hl,lhd->hd", p, v)


def pow2_scale(hkv: int, d: int, seed: int) -> torch.Tensor:
    """A K scale as calibration makes one: powers of two, some above 1, some below."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.randint(-3, 4, (1, hkv, d), generator=g).float())


@pytest.mark.parametrize("name,rotate_v,k_center", [
    ("bf16", False, False), ("int4", False, False), ("int4", False, True),
    ("int4-bdr", False, False), ("int4-bdr", True, True),
])
def test_paged_attention_matches_float64(name: str, rotate_v: bool, k_center: bool) -> None:
    torch.manual_seed(0)
    d, hq, hkv, page = 64, 6, 2, 4
    fmt = KVFormat.make(name, d, 32, rotate_v, k_center)
    pool = KVPool(fmt, 1, hkv, num_pages=16, page_size=page, device=torch.device("cpu"))
    if k_center:
        pool.k_mean = torch.randn(1, hkv, d) * 5
    cache = pool.layer(0)  # after k_mean: the layer view carries it
    lens = [1, 7, 13]  # 1 token, inside a page, across page boundaries
    tables, keys, values = [], [], []
    for n in lens:
        pages = pool.allocate(pool.pages_for(n))
        assert pages is not None
        slots = torch.tensor([pages[p // page] * page + p % page for p in range(n)])
        k = outlier_rows(n * hkv, d, seed=n).view(n, hkv, d).float()
        v = torch.randn(n, hkv, d)
        write_kv_ref(k, v, slots, cache, fmt)
        tables.append(pages + [0] * (4 - len(pages)))
        keys.append(k)
        values.append(v)
    q = torch.randn(len(lens), hq, d)
    out = paged_attention_ref(q, torch.tensor([0, 1, 2, 3]), torch.tensor(lens), torch.tensor(tables), page,
                              cache, fmt, 1 / math.sqrt(d))
    for b in range(len(lens)):
        # Expected: float64 attention over exactly what the format stores, in its own space.
        stored_k, stored_v = stored(encode_k(keys[b], fmt, cache.k_mean), fmt), stored(encode_v(values[b], fmt), fmt)
        want = naive_attention(encode_q(q[b], fmt), stored_k, stored_v, 1 / math.sqrt(d))
        want = decode_o(want, fmt)
        assert (out[b].double() - want).abs().max() < 1e-4, (name, b)


@pytest.mark.parametrize("rotated", [False, True])
def test_k_scale_and_centering_leave_attention_unchanged_in_float64(rotated: bool) -> None:
    """The folding is exact: attention of R(q lambda) over R(k / lambda - mu) equals that of q over k."""
    fmt = KVFormat.make("int4-bdr" if rotated else "int4", 64, 32, k_center=True, k_scale=True)
    g = torch.Generator().manual_seed(5)
    hkv, hq = 2, 8
    k = outlier_rows(40 * hkv, 64, seed=6).view(40, hkv, 64)
    v = torch.randn(40, hkv, 64, generator=g, dtype=torch.float64)
    q = torch.randn(hq, 64, generator=g, dtype=torch.float64)
    lam = pow2_scale(hkv, 64, seed=7)[0].double()
    mu = torch.randn(hkv, 64, generator=g, dtype=torch.float64)
    folded = naive_attention(encode_q(q, fmt, lam).double(), encode_k(k, fmt, mu, lam).double(), v, 0.125)
    assert (folded - naive_attention(q, k, v, 0.125)).abs().max() < 1e-5


def stored(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    if not fmt.quantized:
        return x.bfloat16().double()
    return dequantize_int4(*quantize_int4(x)).double()
