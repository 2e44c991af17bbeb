"""SGLang's attention backend over saw's kernels: each SGLang forward batch becomes a saw `StepLayout`, and the
layers' calls go to saw's `TritonBackend.forward_decode` / `forward_extend` (the code saw's own engine runs).

SGLang gives, per batch, the requests' rows of its req_to_token table (token -> slot), their lengths and, for
extend, the cached-prefix and new lengths; saw's kernels take a page table (page ids, slot = page * P + offset),
which is every P-th entry of those rows divided by P: SGLang's paged allocator keeps a request's tokens in
whole, aligned pages. Decode CUDA graphs read the layout from static buffers this class owns, filled on the device
before each replay; the slots the step writes are SGLang's own static out_cache_loc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from saw_sglang.pool import SawKVPool
from saw_worker.kv.backend import StepLayout
from saw_worker.kv.triton_backend import TritonBackend

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.model_executor.model_runner import ModelRunner


class SawAttentionBackend(AttentionBackend):
    def __init__(self, runner: ModelRunner) -> None:
        super().__init__()
        pool = runner.token_to_kv_pool
        if not isinstance(pool, SawKVPool):
            raise ValueError("--attention-backend saw needs saw's KV pool (the saw_sglang plugin was not loaded)")
        self.pool = pool
        self.page_size = pool.page_size
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.max_pages = -(-self.req_to_token.shape[1] // self.page_size)
        self.kernels = TritonBackend(pool.saw, sm_scale=1.0)  # sm_scale: each layer's own, set per call
        self.layout: StepLayout | None = None
        self._checked: set[int] = set()
        self._graph: dict[str, torch.Tensor] = {}

    # --- metadata ------------------------------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        mode = forward_batch.forward_mode
        self._check_mode(mode)
        bs = forward_batch.batch_size
        seq_lens = forward_batch.seq_lens.to(torch.int32)
        width = -(-int(forward_batch.seq_lens_cpu.max()) // self.page_size)
        table = self._page_table(forward_batch.req_pool_indices, width)
        if mode.is_decode():
            cu = torch.arange(bs + 1, dtype=torch.int32, device=seq_lens.device)
            self.layout = StepLayout(forward_batch.out_cache_loc, cu, seq_lens, seq_lens - 1, table, True, 1)
            return
        new = forward_batch.extend_seq_lens.to(torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(new, 0, dtype=torch.int32), (1, 0))
        self.layout = StepLayout(forward_batch.out_cache_loc, cu, seq_lens, forward_batch.extend_prefix_lens.to(
            torch.int32), table, False, max(forward_batch.extend_seq_lens_cpu),
            max(forward_batch.extend_prefix_lens_cpu))

    def _page_table(self, req_pool_indices: torch.Tensor, width: int) -> torch.Tensor:
        p = self.page_size
        return (self.req_to_token[req_pool_indices, : width * p : p] // p).to(torch.int32)

    @staticmethod
    def _check_mode(mode: ForwardMode) -> None:
        if not (mode.is_decode() or mode.is_extend()) or mode.is_target_verify() or mode.is_draft_extend():
            raise NotImplementedError(f"saw's attention backend runs decode and extend batches, not {mode.name}")

    # --- decode CUDA graphs --------------------------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        dev = self.req_to_token.device
        self._graph = {"seq_lens": torch.ones(max_bs, dtype=torch.int32, device=dev),
                       "prefix_lens": torch.zeros(max_bs, dtype=torch.int32, device=dev),
                       "page_table": torch.zeros(max_bs, self.max_pages, dtype=torch.int32, device=dev),
                       "cu": torch.arange(max_bs + 1, dtype=torch.int32, device=dev)}

    def init_forward_metadata_capture_cuda_graph(self, bs: int, num_tokens: int, req_pool_indices: torch.Tensor,
                                                 seq_lens: torch.Tensor, encoder_lens: torch.Tensor | None,
                                                 forward_mode: ForwardMode, spec_info: object) -> None:
        if not forward_mode.is_decode() or spec_info is not None:
            raise NotImplementedError("saw's attention backend captures plain decode graphs only")
        self._fill_graph(bs, req_pool_indices, seq_lens, self.max_pages)
        g = self._graph
        # slots: SGLang's static out_cache_loc, taken at the first layer's call (forward)
        self.layout = StepLayout(torch.empty(0, dtype=torch.int64), g["cu"][: bs + 1], g["seq_lens"][:bs],
                                 g["prefix_lens"][:bs], g["page_table"][:bs], True, 1)

    def init_forward_metadata_replay_cuda_graph(self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                                                seq_lens_sum: int, encoder_lens: torch.Tensor | None,
                                                forward_mode: ForwardMode, spec_info: object,
                                                seq_lens_cpu: torch.Tensor | None, **kwargs: object) -> None:
        assert seq_lens_cpu is not None
        width = -(-int(seq_lens_cpu[:bs].max()) // self.page_size)
        self._fill_graph(bs, req_pool_indices, seq_lens, width)

    def _fill_graph(self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, width: int) -> None:
        g = self._graph
        g["seq_lens"][:bs].copy_(seq_lens[:bs])
        g["prefix_lens"][:bs].copy_(seq_lens[:bs] - 1)
        g["page_table"][:bs, :width].copy_(self._page_table(req_pool_indices[:bs], width))

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1  # a padded row attends to one token of page 0 and writes to slot 0, SGLang's padding slot

    # --- the layers' calls ---------------------------------------------------------------------------------------

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
                       forward_batch: ForwardBatch, save_kv_cache: bool = True, **kwargs: object) -> torch.Tensor:
        lay, cache, q3, k = self._prepare(q, k, layer, forward_batch, save_kv_cache, kwargs)
        return self.kernels.forward_decode(q3, k, v, cache, lay).reshape(q.shape[0], -1)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
                       forward_batch: ForwardBatch, save_kv_cache: bool = True, **kwargs: object) -> torch.Tensor:
        lay, cache, q3, k = self._prepare(q, k, layer, forward_batch, save_kv_cache, kwargs)
        return self.kernels.forward_extend(q3, k, v, cache, lay).reshape(q.shape[0], -1)

    def _prepare(self, q: torch.Tensor, k: torch.Tensor | None, layer: RadixAttention, forward_batch: ForwardBatch,
                 save_kv_cache: bool, kwargs: dict[str, object]) -> tuple[StepLayout, object, torch.Tensor,
                                                                          torch.Tensor]:
        """The step's layout, the layer's cache, and q [T, Hq, D], k [T, Hkv, D] as the kernels take them (times and
        divided by the layer's K scale)."""
        lay = self.layout
        assert lay is not None, "init_forward_metadata was not called"
        if layer.layer_id not in self._checked:
            self._check_layer(layer, k, save_kv_cache, kwargs)
        assert k is not None
        if lay.slots is not forward_batch.out_cache_loc:
            lay.slots = forward_batch.out_cache_loc
        self.kernels.sm_scale = layer.scaling  # one backend serves every layer; the scale is the layer's
        pool, index = self.pool, layer.layer_id - self.pool.start_layer
        q3 = q.view(-1, layer.tp_q_head_num, layer.head_dim)
        if index in pool.uncalibrated and not lay.is_decode:  # decode before it: CUDA graph capture, dummy inputs
            self._check_calibration_prompt(forward_batch)
            pool.calibrate(index, q3, k)
        if pool.k_scale is not None:  # exact: powers of two
            lam = pool.k_scale[index]
            lam = lam if lam.dtype == q.dtype else lam.to(q.dtype)
            t, hkv, d = k.shape
            q3 = (q3.view(t, hkv, -1, d) * lam[:, None]).view(t, -1, d)
            k = k / lam
        return lay, pool.layer(layer.layer_id), q3, k

    def _check_calibration_prompt(self, forward_batch: ForwardBatch) -> None:
        """The K calibration is measured on the worker's calibration prompt, which it sends first; another
        first prefill would calibrate on the wrong text, and is refused."""
        want = self.pool.calibration_tokens
        if (forward_batch.batch_size != 1 or forward_batch.extend_prefix_lens_cpu[0] != 0
                or forward_batch.extend_seq_lens_cpu[0] != want):
            raise RuntimeError(f"saw's K calibration expects its calibration prompt ({want} tokens) as the first "
                               "prefill; this one is a batch of other requests")

    def _check_layer(self, layer: RadixAttention, k: torch.Tensor | None, save_kv_cache: bool,
                     kwargs: dict[str, object]) -> None:
        """What saw's kernels do not do is refused, per layer, at its first call."""
        if k is None or not save_kv_cache:
            raise NotImplementedError("saw's attention backend stores every layer's own K/V (no cross-layer sharing)")
        if layer.logit_cap and layer.logit_cap > 0:
            raise NotImplementedError("saw's kernels have no attention logit soft-capping (this model uses it)")
        if getattr(layer, "sliding_window_size", -1) not in (None, -1):
            raise NotImplementedError("saw's kernels have no sliding-window attention (this model uses it)")
        if getattr(layer, "is_cross_attention", False) or kwargs.get("sinks") is not None:
            raise NotImplementedError("saw's kernels do not do cross-attention or learned attention sinks")
        if layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError("saw's kernels need equal K and V head dims")
        self._checked.add(layer.layer_id)
