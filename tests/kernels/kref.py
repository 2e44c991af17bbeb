"""Float64 references and random paged-cache scenarios for the kernel tests (built on formats.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saw_kv.cache import LayerCache
from saw_kv.formats import KVFormat, decode_o, dequantize_int4, encode_q, rotate
from saw_worker.config import ModelConfig
from saw_worker.models import DecoderLM, FullCausalAttention
from saw_worker.models.rope import apply_rope

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rand_kv(t: int, hkv: int, d: int, outliers: bool = True, gen: torch.Generator | None = None) -> torch.Tensor:
    """bf16 [T, Hkv, D] with a few large outlier channels and a constant offset (what breaks INT4)."""
    x = torch.randn(t, hkv, d, generator=gen, dtype=torch.float64)
    if outliers:
        ch = torch.randperm(d, generator=gen)[:3]
        x[:, :, ch] = x[:, :, ch] * 6 + 10
    return x.to(DEV, torch.bfloat16)


def empty_cache(fmt: KVFormat, slots: int, hkv: int, page_size: int, k_mean: torch.Tensor | None = None
                ) -> LayerCache:
    """A poisoned cache: 0xFF bytes and NaN params / bf16 so unwritten reads show up."""
    d = fmt.head_dim
    if fmt.quantized:
        data = torch.full((slots, hkv, d // 2), 0xFF, dtype=torch.uint8, device=DEV)
        par = torch.full((slots, hkv, 2), float("nan"), dtype=torch.float16, device=DEV)
        return LayerCache(data, data.clone(), fmt, page_size, par, par.clone(), k_mean)
    data = torch.full((slots, hkv, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    return LayerCache(data, data.clone(), fmt, page_size, k_mean=k_mean)


def stored(cache: LayerCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored K, V rows at slots (any shape) as float64, in the stored (centered / rotated) space."""
    if cache.k_params is None:
        return cache.k[slots].double(), cache.v[slots].double()
    return (dequantize_int4(cache.k[slots], cache.k_params[slots]).double(),
            dequantize_int4(cache.v[slots], cache.v_params[slots]).double())


def raw_rows(cache: LayerCache, slots: torch.Tensor, fmt: KVFormat, k_mean: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored K, V rows at slots as float64, taken back to the model's space: K = R x + mu, V = R x
    (each step where the format has it and its tensor is given, as formats.encode_k applies them)."""
    keys, values = stored(cache, slots)
    if fmt.rotated:
        keys = rotate(keys, fmt.hadamard_order)
    if fmt.k_center and k_mean is not None:
        keys = keys + k_mean.double()
    return keys, decode_o(values, fmt)


@dataclass
class Paged:
    page_table: torch.Tensor  # int32 [B, P]
    page_size: int
    num_slots: int

    def slots(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        pages = self.page_table[b].long()[positions // self.page_size]
        return pages * self.page_size + positions % self.page_size


def make_pages(lens: list[int], page_size: int, gen: torch.Generator | None = None) -> Paged:
    """Random distinct pages per request (page 0 left unused, as in the pool); extra columns point at 0."""
    need = [-(-n // page_size) for n in lens]
    width = max(need) + 1
    total = sum(need) + 3
    perm = torch.randperm(total, generator=gen)[: sum(need)] + 1
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n].int()
        at += n
    return Paged(table.to(DEV), page_size, (total + 1) * page_size)


def attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float,
                  mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 GQA attention: q [M, Hq, D], keys/values [N, Hkv, D], mask [M, N] bool, bias [M, Hq, N]."""
    hq, hkv = q.shape[1], keys.shape[1]
    kk = keys.repeat_interleave(hq // hkv, 1).double()
    vv = values.repeat_interleave(hq // hkv, 1).double()
    s = torch.einsum("mhd,nhd->mhn", q.double(), kk) * sm_scale
    if bias is not None:
        s = s + bias * sm_scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("mhn,nhd->mhd", s.softmax(-1), vv)


def decode_ref(q: torch.Tensor, cache: LayerCache, paged: Paged, lens: list[int], fmt: KVFormat,
               sm_scale: float) -> torch.Tensor:
    out = []
    for b, n in enumerate(lens):
        keys, values = stored(cache, paged.slots(b, torch.arange(n, device=DEV)))
        o = attention_ref(encode_q(q[b:b + 1].double(), fmt).double(), keys, values, sm_scale)
        out.append(decode_o(o, fmt))
    return torch.cat(out)


def extend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int], prefix: list[int], cache: LayerCache,
               paged: Paged, fmt: KVFormat, sm_scale: float, k_mean: torch.Tensor | None) -> torch.Tensor:
    """Prefix from the cache (stored space, logits shifted back by q.mu), new tokens raw, causal."""
    d, hq, hkv = q.shape[-1], q.shape[1], k.shape[1]
    out = []
    for b in range(len(prefix)):
        qb = q[cu[b]:cu[b + 1]].double()
        n, p = qb.shape[0], prefix[b]
        keys, values = stored(cache, paged.slots(b, torch.arange(p, device=DEV)))
        qr = encode_q(qb, fmt).double()
        s_pre = torch.einsum("mhd,nhd->mhn", qr, keys.repeat_interleave(hq // hkv, 1))
        if fmt.k_center and k_mean is not None:
            mu = k_mean.double().repeat_interleave(hq // hkv, 0)  # [Hq, D]
            s_pre = s_pre + torch.einsum("mhd,hd->mh", qb, mu)[:, :, None]
        s_new = torch.einsum("mhd,nhd->mhn", qb, k[cu[b]:cu[b + 1]].double().repeat_interleave(hq // hkv, 1))
        causal = torch.ones(n, n, dtype=torch.bool, device=DEV).tril()
        s_new = s_new.masked_fill(~causal[:, None, :], float("-inf"))
        w = (torch.cat([s_pre, s_new], -1) * sm_scale).softmax(-1)
        o_pre = decode_o(torch.einsum("mhn,nhd->mhd", w[..., :p], values.repeat_interleave(hq // hkv, 1)), fmt)
        o_new = torch.einsum("mhn,nhd->mhd", w[..., p:], v[cu[b]:cu[b + 1]].double().repeat_interleave(hq // hkv, 1))
        out.append(o_pre + o_new)
    return torch.cat(out).reshape(-1, hq, d)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output (unwritten or poisoned element)"
    return ((out.double() - ref).norm() / ref.norm()).item()


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def ref_qk(qkv: torch.Tensor, hq: int, hkv: int, d: int, qw: torch.Tensor | None, kw: torch.Tensor | None,
           cache: torch.Tensor, pos: torch.Tensor, k_scale: torch.Tensor | None = None, eps: float = 1e-6
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """decoder.DecoderLayer's torch path, in float64."""
    t = qkv.shape[0]
    q, k, _ = qkv.double().split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(t, hq, d), k.reshape(t, hkv, d)
    if qw is not None and kw is not None:
        q, k = F.rms_norm(q, (d,), qw.double(), eps), F.rms_norm(k, (d,), kw.double(), eps)
    cos, sin = cache[pos].double().unsqueeze(1).chunk(2, dim=-1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if k_scale is not None:
        lam = k_scale.double()
        q, k = q * lam.repeat_interleave(hq // hkv, 0), k / lam
    return q, k


def tiny_decoder(arch: str, dtype: torch.dtype, device: torch.device | str = "cpu", cache: bool = False
                 ) -> tuple[DecoderLM, torch.Generator]:
    """A random 2-layer DecoderLM of `arch` (qwen2: biases, qwen3: q/k norms) whose norm weights and biases are
    non-trivial (q_norm != k_norm), and the generator that drew them, for the test's further inputs."""
    cfg = ModelConfig(
        architecture=arch, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, rope_theta=1e4, rope_scaling=None, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=True, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
    )
    model = DecoderLM(cfg, FullCausalAttention(cfg.num_heads, cfg.num_kv_heads, cache=cache), device=device,
                      dtype=dtype)
    model.init_random_(seed=1, std=0.2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn(p.shape, generator=gen).to(device, dtype) * 0.3)
    return model, gen
