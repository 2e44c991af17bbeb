"""SGLang's token-to-KV pool storing saw's formats.

SGLang allocates token slots (its radix cache and allocator stay as they are); this pool holds, per layer, what
saw's kernels read and write at those slots: bf16 K/V, or packed INT4 codes + fp16 (scale, lo) per (token, head).
The tensors are a saw `KVPool`'s, so the layer views (`LayerCache`) are the ones saw's own engine uses. SGLang's
slot 0..page_size-1 (page 0) is its padding slot, as it is saw's.

With K centering / the K scale the pool also holds the calibration, per layer: the K mean the kernels subtract
and the power-of-two scale the backend applies to q and K. Both exist from the start (mean 0, scale 1: no-ops),
so decode CUDA graphs captured before calibration read the calibrated values after it; they are filled from a
--k-mean-file here, or by the backend from the first prefill (`uncalibrated` names the layers still waiting).
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import KVCache

from saw_kv.cache import LayerCache
from saw_sglang.config import spec_from_env
from saw_worker.kv import calibration
from saw_worker.kv.pool import KVPool


class SawKVPool(KVCache):
    """Built where SGLang builds its MHATokenToKVPool (plugin.py), with the same arguments."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int,
                 device: str, enable_memory_saver: bool, v_head_dim: int | None = None,
                 start_layer: int | None = None, end_layer: int | None = None, enable_alt_stream: bool = True,
                 enable_kv_cache_copy: bool = False) -> None:
        super().__init__(size, page_size, dtype, layer_num, device, enable_memory_saver, start_layer, end_layer)
        if v_head_dim not in (None, head_dim):
            raise ValueError(f"saw's KV formats need equal K and V head dims (got {head_dim} and {v_head_dim})")
        if enable_kv_cache_copy:
            raise ValueError("speculative decoding is not supported with saw's KV pool")
        if page_size & (page_size - 1):
            raise ValueError(f"saw's kernels need a power-of-two --page-size, got {page_size}")
        self.head_num, self.head_dim, self.v_head_dim = head_num, head_dim, head_dim
        # No element type: SGLang's models write K/V inside their RoPE kernel, past the attention backend, into a
        # pool whose dtype is bf16 (models/utils.py enable_fused_set_kv_buffer: Qwen3-MoE, GPT-OSS, ...); saw's
        # backend writes (and quantizes) every layer's K/V itself.
        self.dtype = None
        spec = spec_from_env()
        self.fmt = fmt = spec.format(head_dim)
        # SGLang hands out slots 0 .. size + page_size - 1 (page 0: padding)
        self.saw = KVPool(fmt, layer_num, head_num, size // page_size + 1, page_size, torch.device(device))
        shape = (layer_num, head_num, head_dim)
        if fmt.k_center:
            self.saw.k_mean = torch.zeros(shape, dtype=torch.float32, device=device)
        # lambda in the model's dtype when that is bf16 (exact: powers of two up to 2^16), so a step casts nothing
        scale_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        self.k_scale = torch.ones(shape, dtype=scale_dtype, device=device) if fmt.k_scale else None
        self.k_scale_alpha = spec.k_scale_alpha
        self.calibration_tokens = spec.calibration_tokens
        self.uncalibrated: set[int] = set()
        if spec.k_calibration is not None:
            self._load_calibration(spec.k_calibration)
        elif spec.measures_calibration(head_dim):
            if not spec.calibration_tokens:
                raise ValueError("K centering / the K scale need a calibration: a k_calibration file (--k-mean-file), "
                                 "or saw's worker, which sends its calibration prompt first; or k_center and k_scale "
                                 "false")
            self.uncalibrated = set(range(layer_num))
        self._finalize_allocation_log(size)

    def _load_calibration(self, path: str) -> None:
        cal = calibration.load(path, self.layer_num, self.head_num, self.head_dim, self.fmt.k_scale)
        if self.fmt.k_center:
            if cal.k_mean is None:
                raise ValueError(f"{path} holds no k_mean; give --no-k-center or a file with one")
            self.saw.k_mean.copy_(cal.k_mean)
        if self.k_scale is not None:
            self.k_scale.copy_(cal.k_scale)

    def calibrate(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Layer's (pool index) K mean and scale from its first prefill's q [T, Hq, D] and post-RoPE k [T, Hkv, D],
        before that prefill's keys are stored with them."""
        q_max = calibration.query_absmax(q, self.head_num) if self.k_scale is not None else None
        mean, lam = calibration.layer_calibration(k, q_max, self.k_scale_alpha)
        if self.k_scale is not None:
            self.k_scale[layer].copy_(lam)
        if self.fmt.k_center:
            self.saw.k_mean[layer].copy_(mean)
        self.uncalibrated.discard(layer)

    def layer(self, layer_id: int) -> LayerCache:
        return self.saw.layer(layer_id - self.start_layer)

    def get_kv_size_bytes(self) -> tuple[int, int]:
        k = v = 0
        for i in range(self.layer_num):
            c = self.saw.layer(i)
            k += c.k.nbytes + (c.k_params.nbytes if c.k_params is not None else 0)
            v += c.v.nbytes + (c.v_params.nbytes if c.v_params is not None else 0)
        return k, v

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.layer(layer_id).k

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.layer(layer_id).v

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def set_kv_buffer(self, layer: object, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      *args: object, **kwargs: object) -> None:
        # Only saw's attention backend writes here (quantizing as it stores); another writer would store bf16
        # rows into packed INT4 tensors.
        raise NotImplementedError("saw's KV pool is written by saw's attention backend only (--attention-backend "
                                  "saw); this SGLang feature writes the KV cache itself and is not supported")
