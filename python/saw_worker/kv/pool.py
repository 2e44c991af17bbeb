"""Paged KV pool: one set of tensors per layer, addressed by token slot.

Layers named in `bf16_layers` keep their K/V at bf16 whatever the format (an accuracy option for
models whose first layers' keys quantize badly, docs/accuracy.md); the kernels take each layer's
own format, so nothing else changes.

slot = page_id * page_size + offset. A request owns whole pages; its page table maps position p
to slot page_table[p // page_size] * page_size + p % page_size. Page 0 is never handed out: padded
batch rows (CUDA graphs) point at it, so their writes land somewhere harmless.

With a window (formats.py), every quantized layer also has a bf16 ring [rows, S + W, Hkv, D] for K and
V: a request holding pages holds one row, whose slot p < S keeps sink p's raw K/V and slot S + p % W
position p's while p is among the request's newest W tokens. The last row is never handed out: tokens
that leave the window at once (the early ones of a long prefill chunk) and padded rows write there.
With S <= page_size the pool also keeps a sink store [entries, S, Hkv, D] per layer, one entry per ring row:
the prefix cache saves a request's sinks there under its first page, and a later request served from that
page gets them back at bf16 (PrefixCache.keep_sinks / restore_sinks).
"""

from __future__ import annotations

import torch

from saw_kv.cache import LayerCache
from saw_kv.formats import PARAM_DTYPE, KVFormat


def layer_formats(fmt: KVFormat, num_layers: int, bf16_layers: frozenset[int]) -> list[KVFormat]:
    bad = sorted(i for i in bf16_layers if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"--bf16-layers {bad} outside the model's {num_layers} layers")
    plain = KVFormat("bf16", fmt.head_dim)  # no window either: the whole layer is bf16
    return [plain if i in bf16_layers else fmt for i in range(num_layers)]


def bytes_per_token(fmt: KVFormat, num_layers: int, num_kv_heads: int, bf16_layers: frozenset[int] = frozenset()
                    ) -> int:
    return sum(f.bytes_per_token_head() for f in layer_formats(fmt, num_layers, bf16_layers)) * num_kv_heads


def window_bytes_per_request(fmt: KVFormat, num_layers: int, num_kv_heads: int,
                             bf16_layers: frozenset[int] = frozenset()) -> int:
    """Bytes of one ring row over all layers: what a running request costs on top of its pages."""
    return sum(f.window_bytes_per_head() for f in layer_formats(fmt, num_layers, bf16_layers)) * num_kv_heads


def keeps_cached_sinks(fmt: KVFormat, page_size: int) -> bool:
    """Whether the pool has a sink store: the sinks fit in a request's first page, the prefix cache's key."""
    return 0 < fmt.sinks <= page_size


def ring_row_bytes(fmt: KVFormat, num_layers: int, num_kv_heads: int, page_size: int,
                   bf16_layers: frozenset[int] = frozenset()) -> int:
    """Bytes of one ring row and, with a sink store, the store entry that comes with it."""
    per_row = window_bytes_per_request(fmt, num_layers, num_kv_heads, bf16_layers)
    return per_row + (per_row * fmt.sinks // fmt.ring_slots if keeps_cached_sinks(fmt, page_size) else 0)


class KVPool:
    def __init__(self, fmt: KVFormat, num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
                 device: torch.device, bf16_layers: frozenset[int] = frozenset(), window_rows: int = 0) -> None:
        """window_rows: ring rows handed out (one per request holding pages; the scheduler admits no more)."""
        if num_pages < 2:
            raise ValueError("KV budget too small: it must hold at least two pages")
        self.fmt = fmt
        self.formats = layer_formats(fmt, num_layers, bf16_layers)
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_layers = num_layers
        self.device = torch.device(device)
        slots, d = num_pages * page_size, fmt.head_dim
        # One tensor per (format, K or V) holding all layers of that format; _index maps a layer to its row.
        self._index: dict[int, int] = {}
        self._tensors: dict[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        for quantized in (False, True):
            layers = [i for i, f in enumerate(self.formats) if f.quantized == quantized]
            if not layers:
                continue
            self._index.update({layer: row for row, layer in enumerate(layers)})
            shape = (len(layers), slots, num_kv_heads)
            if quantized:
                data = dict(size=(*shape, d // 2), dtype=torch.uint8, device=device)
                params = dict(size=(*shape, 2), dtype=PARAM_DTYPE, device=device)
                self._tensors[True] = (torch.zeros(**data), torch.zeros(**data), torch.zeros(**params),
                                       torch.zeros(**params))
            else:
                data = dict(size=(*shape, d), dtype=torch.bfloat16, device=device)
                self._tensors[False] = (torch.zeros(**data), torch.zeros(**data), None, None)
        self._k_mean: torch.Tensor | None = None
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        if fmt.window and window_rows < 1:
            raise ValueError("a KV format with a window needs window_rows (one per request that may hold pages)")
        self.window = fmt.window
        self.sinks = fmt.sinks
        self._ring: tuple[torch.Tensor, torch.Tensor] | None = None
        self.window_rows = window_rows if fmt.window else 0
        if self.window_rows:
            shape = (sum(f.quantized for f in self.formats), self.window_rows + 1, fmt.ring_slots, num_kv_heads, d)
            self._ring = (torch.zeros(shape, dtype=torch.bfloat16, device=device),
                          torch.zeros(shape, dtype=torch.bfloat16, device=device))
        self._free_rows = list(range(self.window_rows - 1, -1, -1))
        self.sink_entries = self.window_rows if keeps_cached_sinks(fmt, page_size) else 0
        self._sink_store: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.sink_entries:
            shape = (sum(f.quantized for f in self.formats), self.sink_entries, fmt.sinks, num_kv_heads, d)
            self._sink_store = (torch.zeros(shape, dtype=torch.bfloat16, device=device),
                                torch.zeros(shape, dtype=torch.bfloat16, device=device))
        self._layers = [self._layer_view(i) for i in range(num_layers)]

    @classmethod
    def from_budget(cls, fmt: KVFormat, num_layers: int, num_kv_heads: int, budget_bytes: int, page_size: int,
                    device: torch.device, bf16_layers: frozenset[int] = frozenset(), window_rows: int = 0) -> KVPool:
        """A pool in budget_bytes: the rings (one row per request that may hold pages, plus the dump row)
        come off the budget first, the pages take the rest. Rings never take more than a quarter of the
        budget: with fewer rows than window_rows, admission stops at the rows (see `free_rows`)."""
        per_row = ring_row_bytes(fmt, num_layers, num_kv_heads, page_size, bf16_layers)
        rows = min(window_rows, budget_bytes // (4 * per_row) - 1) if fmt.window else 0
        if fmt.window and rows < 1:
            raise ValueError(f"KV budget too small for the bf16 window: one request's ring takes {per_row} bytes; "
                             "give more memory, or a smaller --window")
        rings = (rows + 1) * per_row if rows else 0
        per_page = bytes_per_token(fmt, num_layers, num_kv_heads, bf16_layers) * page_size
        return cls(fmt, num_layers, num_kv_heads, max(budget_bytes - rings, 0) // per_page, page_size, device,
                   bf16_layers, rows)

    @property
    def k_mean(self) -> torch.Tensor | None:
        """fp32 [L, Hkv, D], set by calibration (--k-center); None before, or without centering."""
        return self._k_mean

    @k_mean.setter
    def k_mean(self, value: torch.Tensor | None) -> None:
        self._k_mean = value
        self._layers = [self._layer_view(i) for i in range(self.num_layers)]  # the views carry each layer's mean

    def layer(self, i: int) -> LayerCache:
        """Layer i's view of the pool (kept, so a step's attention calls do not rebuild it; setting k_mean
        renews it)."""
        return self._layers[i]

    def _layer_view(self, i: int) -> LayerCache:
        fmt = self.formats[i]
        row = self._index[i]
        k, v, kp, vp = self._tensors[fmt.quantized]
        k_mean = self.k_mean[i] if self.k_mean is not None and fmt.k_center else None
        ring_k = ring_v = None
        if self._ring is not None and fmt.window:
            ring_k, ring_v = self._ring[0][row], self._ring[1][row]
        return LayerCache(k[row], v[row], fmt, self.page_size, None if kp is None else kp[row],
                          None if vp is None else vp[row], k_mean, ring_k, ring_v)

    @property
    def dump_row(self) -> int:
        """The ring row nobody holds: writes that must not be kept go there."""
        return self.window_rows

    @property
    def dump_slot(self) -> int:
        """The dump row's first flat ring slot (row * (S + W) + slot, as write_window takes them)."""
        return self.dump_row * self.fmt.ring_slots

    def allocate_row(self) -> int | None:
        """A ring row for a request about to hold pages; None when all are held (or there is no window)."""
        return self._free_rows.pop() if self._free_rows else None

    def release_row(self, row: int) -> None:
        self._free_rows.append(row)

    def save_sinks(self, row: int, entry: int) -> None:
        """Copy ring row's sinks (every layer, K and V) into sink store entry (queued on the device: after the
        steps that wrote them)."""
        assert self._ring is not None and self._sink_store is not None
        for ring, store in zip(self._ring, self._sink_store, strict=True):
            store[:, entry] = ring[:, row, :self.sinks]

    def restore_sinks(self, entry: int, row: int) -> None:
        """Copy sink store entry into ring row's sink slots (before the first step that reads them)."""
        assert self._ring is not None and self._sink_store is not None
        for ring, store in zip(self._ring, self._sink_store, strict=True):
            ring[:, row, :self.sinks] = store[:, entry]

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        return (self.num_pages - 1 - len(self._free)) * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages, or None (and nothing taken) when the pool cannot supply them."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
