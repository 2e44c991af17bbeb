"""Builds a LocalEngine from the worker's options: model, KV pool sized to the budget, calibration."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import tokenizers
import torch

from saw_worker.engine.engine import LocalEngine
from saw_worker.engine.interface import EngineInfo
from saw_worker.engine.model_runner import ModelRunner
from saw_worker.engine.scheduler import Scheduler
from saw_worker.kv import calibration
from saw_worker.kv.backend import PagedAttention
from saw_worker.kv.formats import DEFAULT_K_SCALE_ALPHA, KVFormat, default_kv_options
from saw_worker.kv.pool import KVPool, bytes_per_token, window_bytes_per_request
from saw_worker.loader import load_model

log = logging.getLogger("saw_worker")

CPU_DEFAULT_KV_BYTES = 1 << 30  # on CPU "free memory" is the whole machine's; take a fixed slice


@dataclass
class WorkerOptions:
    model: str = "smollm2-135m"
    load_format: str = "auto"
    kv: str = "int4-bdr"
    hadamard_order: int | None = None  # None: default_kv_options
    rotate_v: bool = False
    k_center: bool | None = None  # None: default_kv_options
    k_scale: bool | None = None  # None: default_kv_options
    k_scale_alpha: float = DEFAULT_K_SCALE_ALPHA
    window: int | None = None  # None: default_kv_options
    sinks: int | None = None  # None: default_kv_options
    k_mean_file: str | None = None  # a saved calibration (calibration.load) instead of measuring one
    bf16_layers: frozenset[int] = frozenset()
    device: str = "auto"
    mem_fraction: float = 0.90  # weights + KV pool; 8 GB of an H100 left for activations and graphs
    kv_cache_memory: int | None = None
    page_size: int = 16
    max_running_requests: int = 256
    max_prefill_tokens: int | None = None
    reserve_decode_tokens: int = 1024
    context_length: int | None = None
    cuda_graphs: bool = True
    overlap: bool = True  # see LocalEngine
    prefix_cache: bool = True  # see kv/prefix_cache.py


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def kv_budget(opts: WorkerOptions, device: torch.device) -> int:
    """Bytes for the KV pool: --kv-cache-memory, else what --mem-fraction leaves free on the GPU."""
    if opts.kv_cache_memory is not None:
        return opts.kv_cache_memory
    if device.type != "cuda":
        return CPU_DEFAULT_KV_BYTES
    free, total = torch.cuda.mem_get_info(device)
    reserve = int(total * (1 - opts.mem_fraction))  # activations, CUDA graphs, logits
    return max(free - reserve, 0)


def kv_format(opts: WorkerOptions, head_dim: int) -> KVFormat:
    """The format --kv and its modifiers ask for, defaults filled in per model (default_kv_options)."""
    d = default_kv_options(opts.kv, head_dim)

    def pick(given: bool | int | None, default: bool | int) -> bool | int:
        return default if given is None else given

    window = int(pick(opts.window, d.window))
    return KVFormat.make(opts.kv, head_dim, opts.hadamard_order or d.hadamard_order, opts.rotate_v,
                         bool(pick(opts.k_center, d.k_center)), bool(pick(opts.k_scale, d.k_scale)),
                         window, int(pick(opts.sinks, d.sinks if window else 0)))  # --window 0: no sinks either


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def build_engine(opts: WorkerOptions) -> LocalEngine:
    device = resolve_device(opts.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    # The pool needs the model's shape, so the model is loaded with a plain attention and then
    # switched to the paged one.
    loaded = load_model(opts.model, opts.load_format, device, dtype, _no_attention)
    cfg = loaded.config
    fmt = kv_format(opts, cfg.head_dim)
    budget = kv_budget(opts, device)
    # one ring row per request that may hold pages: the running ones and one being prefilled
    rows = opts.max_running_requests + 1
    pool = KVPool.from_budget(fmt, cfg.num_layers, cfg.num_kv_heads, budget, opts.page_size, device,
                              opts.bf16_layers, rows)
    attention = PagedAttention(pool, cfg.head_dim ** -0.5, use_kernels=device.type == "cuda")
    loaded.model.attention = attention
    runner = ModelRunner(loaded.model, attention, pool, device)
    if fmt.window and pool.window_rows < rows:
        log.warning("the KV budget holds bf16 windows for %d requests, fewer than --max-running-requests + 1: no "
                    "more hold KV at once (--window 0 or more memory lifts this)", pool.window_rows)
    token_bytes = bytes_per_token(fmt, cfg.num_layers, cfg.num_kv_heads, opts.bf16_layers)
    window_bytes = window_bytes_per_request(fmt, cfg.num_layers, cfg.num_kv_heads, opts.bf16_layers)
    log.info("KV pool: %s, %d tokens in %.1f MiB (%d B/token, %d B of bf16 window per request)", fmt.describe(),
             pool.capacity_tokens, budget / 2**20, token_bytes, window_bytes)

    if fmt.k_center or fmt.k_scale:
        started = time.perf_counter()
        if opts.k_mean_file:
            cal = calibration.load(opts.k_mean_file, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
            if fmt.k_scale and cal.k_scale is None:
                raise ValueError(f"{opts.k_mean_file} holds no k_scale; give --no-k-scale or a file with one")
        else:
            ids = tokenizers.Tokenizer.from_str(loaded.tokenizer.tokenizer_json).encode(
                calibration.CALIBRATION_TEXT).ids
            cal = calibration.measure(runner, ids, fmt.k_center, fmt.k_scale, opts.k_scale_alpha)
        pool.k_mean = cal.k_mean.to(device) if fmt.k_center and cal.k_mean is not None else None
        if fmt.k_scale and cal.k_scale is not None:
            for layer, layer_fmt, lam in zip(loaded.model.layers, pool.formats, cal.k_scale.to(device), strict=True):
                layer.k_scale = lam if layer_fmt.k_scale else None
        attention.refresh()
        log.info("K calibration (%s) in %.2fs", opts.k_mean_file or "measured on the built-in text",
                 time.perf_counter() - started)

    context = min(opts.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
    prefill_budget = opts.max_prefill_tokens or (8192 if device.type == "cuda" else 512)
    if device.type == "cuda" and opts.cuda_graphs:
        started = time.perf_counter()
        runner.capture_graphs(opts.max_running_requests, context)
        log.info("captured decode CUDA graphs for batch sizes up to %d in %.1fs", opts.max_running_requests,
                 time.perf_counter() - started)
    scheduler = Scheduler(pool, opts.max_running_requests, prefill_budget, context,
                          frozenset(loaded.tokenizer.eos_token_ids), opts.reserve_decode_tokens, opts.prefix_cache)
    info = EngineInfo(
        model_id=loaded.model_id, tokenizer=loaded.tokenizer, context_length=context, vocab_size=cfg.vocab_size,
        kv_format=fmt.describe(), kv_capacity_tokens=pool.capacity_tokens, page_size=opts.page_size,
        device=device_name(device), kv_bytes_per_token=token_bytes, kv_window_bytes_per_request=window_bytes,
    )
    return LocalEngine(runner, scheduler, info, opts.overlap)



def _no_attention(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the model ran before its KV pool was attached")
