"""The bf16 window (formats.KVFormat.window = W, sinks = S): each request's first S tokens and its last W
tokens before a step, raw, in a ring.

A request owns one ring row of per-layer bf16 tensors [rows, S + W, Hkv, D] holding positions as attention
receives them (post-RoPE, with the model's K scale; not centered or rotated): slot p < S holds sink p, slot
S + p % W position p of the window. Before a step whose new tokens start at position P = ends[b], the row
holds sinks [0, sinks[b]) and window positions [P - lens[b], P): window slot S + j is valid iff
(P - 1 - j) mod W < lens[b]. The attention kernels read INT4 pages from sinks[b] up to P - lens[b] (the INT4
length the engine passes), the valid slots at bf16, then the step's new tokens; `write_window` stores the
step's tokens into the ring after its attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from saw_kernels._common import INTERPRET
from saw_kv.cache import LayerCache


@dataclass(frozen=True)
class Ring:
    """A step's view of its requests' ring rows: which row each request holds and what that row holds before the
    step. The ring tensors themselves are the layer cache's (LayerCache.ring_k / ring_v, bf16 [rows, S + W, Hkv,
    D]), S and W its format's."""

    rows: torch.Tensor  # int32 [B]: each request's ring row
    lens: torch.Tensor  # int32 [B]: valid ring tokens before this step's new ones
    ends: torch.Tensor  # int32 [B]: P, the position of the step's first new token (= prefix_lens)
    # int32 [B]: sink tokens held (positions 0 .. sinks[b] - 1, in slots 0 ..), not read from the INT4 pages;
    # None without sink slots (fmt.sinks == 0)
    sinks: torch.Tensor | None = None

    def int4_starts(self) -> torch.Tensor:
        """Where each request's INT4 reads begin: after its sinks (rows stands in when there are none)."""
        return self.rows if self.sinks is None else self.sinks


def ring_args(cache: LayerCache, ring: Ring) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
    """The ring kernels' tensors (ring K, ring V, rows, lens, ends, INT4 starts) and the ring's (row, slot, head)
    strides, shared by K and V, after checking that cache holds a ring of its format's sinks and window and that
    ring gives sinks exactly when the format has them."""
    fmt, ring_k, ring_v = cache.fmt, cache.ring_k, cache.ring_v
    if ring_k is None or ring_v is None:
        raise ValueError("attention with a ring needs a cache with ring_k and ring_v")
    if ring_k.shape[1] != fmt.ring_slots or (fmt.sinks > 0) != (ring.sinks is not None):
        raise ValueError(f"the ring holds {ring_k.shape[1]} slots{' and sinks' if ring.sinks is not None else ''}, "
                         f"the format {fmt.sinks} sinks and a window of {fmt.window}")
    assert ring_k.stride() == ring_v.stride() and ring_k.stride(-1) == 1
    return ([ring_k, ring_v, ring.rows, ring.lens, ring.ends, ring.int4_starts()],
            (ring_k.stride(0), ring_k.stride(1), ring_k.stride(2)))


def flat_slots(ring_k: torch.Tensor) -> bool:
    """Whether flat slots (row * (S + W) + slot, as the engine computes them) address ring_k: rows are
    contiguous runs of slots, i.e. ring_k.view(-1, Hkv, D) works."""
    return ring_k.stride(-1) == 1 and ring_k.stride(0) == ring_k.shape[1] * ring_k.stride(1)


@triton.jit
def ring_tile(rk_ptr, rv_ptr, rows_ptr, lens_ptr, ends_ptr, sinks_ptr, b, kh, j, c, s_rr, s_rs, s_rh,
              S: tl.constexpr, W: tl.constexpr, D2: tl.constexpr):
    """Ring slots j of request b, head kh: K and V as bf16 halves [N, D/2] and which slots are valid.
    Invalid slots may hold anything (NaN included): they are never loaded, and read as 0."""
    lens = tl.load(lens_ptr + b)
    end = tl.load(ends_ptr + b)
    jw = j - S
    # end - 1 - jw >= -W for jw < W, so adding W keeps the dividend, hence the modulo, non-negative
    valid = (jw >= 0) & (jw < W) & ((end - 1 - jw + W) % W < lens)
    if S > 0:
        valid = valid | (j < tl.load(sinks_ptr + b))
    off = (tl.load(rows_ptr + b).to(tl.int64) * s_rr + j * s_rs + kh * s_rh)[:, None] + c[None, :]
    m = valid[:, None]
    return (tl.load(rk_ptr + off, mask=m, other=0.0), tl.load(rk_ptr + off + D2, mask=m, other=0.0),
            tl.load(rv_ptr + off, mask=m, other=0.0), tl.load(rv_ptr + off + D2, mask=m, other=0.0), valid)


@triton.jit
def _write_window_kernel(k_ptr, v_ptr, slot_ptr, rk_ptr, rv_ptr, n_rows, s_kt, s_kh, s_vt, s_vh, s_rs, s_rh,
                         HKV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    t = rows // HKV
    h = rows % HKV
    slot = tl.load(slot_ptr + t, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, D)[None, :]
    m = ok[:, None]
    k = tl.load(k_ptr + (t.to(tl.int64) * s_kt + h * s_kh)[:, None] + d, mask=m)
    v = tl.load(v_ptr + (t.to(tl.int64) * s_vt + h * s_vh)[:, None] + d, mask=m)
    dst = (slot * s_rs + h * s_rh)[:, None] + d
    tl.store(rk_ptr + dst, k, mask=m)
    tl.store(rv_ptr + dst, v, mask=m)


def write_window(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, ring_k: torch.Tensor,
                 ring_v: torch.Tensor) -> None:
    """ring_k.view(-1, Hkv, D)[slots[t]] = k[t] and the same for v, for K, V [T, Hkv, D] (strided views
    allowed) and int64 slots [T] (all valid: tokens not to keep go to a spare row). One launch, no host reads."""
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and ring_k.stride() == ring_v.stride()
    assert flat_slots(ring_k)
    block = 16 if INTERPRET else 32
    _write_window_kernel[(triton.cdiv(t * hkv, block),)](
        k, v, slots, ring_k, ring_v, t * hkv, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ring_k.stride(1), ring_k.stride(2), HKV=hkv, D=d, BLOCK=block, num_warps=4)
