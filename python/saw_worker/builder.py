"""Builds a LocalEngine from WorkerOptions (options.py): model, KV pool sized to the budget, calibration."""

from __future__ import annotations

import logging
import os
import time

import torch

from saw_kv.formats import KVFormat
from saw_worker.engine.engine import LocalEngine
from saw_worker.engine.interface import EngineInfo
from saw_worker.engine.model_runner import ModelRunner
from saw_worker.engine.scheduler import Scheduler
from saw_worker.kv import calibration, cpu_backend
from saw_worker.kv.backend import AttentionBackend
from saw_worker.kv.pool import KVPool, bytes_per_token, ring_row_bytes
from saw_worker.kv.reference_backend import ReferenceBackend
from saw_worker.loader import load_model
from saw_worker.options import CPU_KV_CACHE_BYTES, KVOptions, PoolOptions, WorkerOptions

log = logging.getLogger("saw_worker")

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def kv_budget(opts: PoolOptions, device: torch.device) -> int:
    """Bytes for the KV pool: --kv-cache-memory, else what --mem-fraction leaves free on the GPU."""
    if opts.kv_cache_memory is not None:
        return opts.kv_cache_memory
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    reserve = int(total * (1 - opts.mem_fraction))  # activations, CUDA graphs, logits
    return max(free - reserve, 0)


def kv_format(opts: KVOptions, head_dim: int) -> KVFormat:
    """The format --kv and its modifiers ask for, defaults filled in per model (KVFormat.with_defaults)."""
    return KVFormat.with_defaults(opts.name, head_dim, opts.hadamard_order, opts.rotate_v, opts.k_center,
                                  opts.k_scale, opts.window, opts.sinks)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def model_dtype(choice: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is bfloat16 on CUDA and where the CPU multiplies bf16 natively (decode is bound by reading
    the weights, so half the bytes is about half the time), else float32 (emulated bf16 matmuls are slower)."""
    if choice != "auto":
        return getattr(torch, choice)
    native_bf16 = device.type == "cuda" or any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native_bf16 else torch.float32


def attention_backend(pool: KVPool, sm_scale: float, device: torch.device) -> AttentionBackend:
    """The one place the attention implementation is chosen: the Triton kernels on CUDA, saw's native CPU kernel
    for decode on the CPU (the torch reference where the native module is not built, e.g. a bare source tree)."""
    if device.type == "cuda":
        from saw_worker.kv.triton_backend import TritonBackend  # imports saw_kernels: a GPU build of Triton

        return TritonBackend(pool, sm_scale)
    if device.type == "cpu" and cpu_backend.native_available():
        return cpu_backend.CpuBackend(pool, sm_scale)
    log.warning("saw_router._native is not built: CPU decode runs the torch reference (slow)")
    return ReferenceBackend(pool, sm_scale)


def build_engine(opts: WorkerOptions) -> LocalEngine:
    device = resolve_device(opts.model.device)
    dtype = model_dtype(opts.model.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    # The pool is sized by the memory the weights leave and needs the model's shape, so the model is loaded with a
    # placeholder attention and given the backend once the pool exists (its only attention change).
    loaded = load_model(opts.model.name, opts.model.load_format, device, dtype, _no_attention,
                        cpu_int4=opts.model.cpu_int4_weights, cpu_int8=opts.model.cpu_int8_weights,
                        cpu_blocks=opts.model.cpu_gguf_blocks)
    cfg = loaded.config
    fmt = kv_format(opts.kv, cfg.head_dim)
    budget = kv_budget(opts.pool, device)
    # one ring row per request that may hold pages: the running ones and one being prefilled
    rows = opts.scheduler.max_running_requests + 1
    pool = KVPool.from_budget(fmt, cfg.num_layers, cfg.num_kv_heads, budget, opts.pool.page_size, device,
                              opts.kv.bf16_layers, rows)
    backend = attention_backend(pool, cfg.head_dim ** -0.5, device)
    loaded.model.attention = backend
    runner = ModelRunner(loaded.model, backend, pool, device)
    if fmt.window and pool.window_rows < rows:
        log.warning("the KV budget holds bf16 windows for %d requests, fewer than --max-running-requests + 1: no "
                    "more hold KV at once (--window 0 or more memory lifts this)", pool.window_rows)
    token_bytes = bytes_per_token(fmt, cfg.num_layers, cfg.num_kv_heads, opts.kv.bf16_layers)
    window_bytes = ring_row_bytes(fmt, cfg.num_layers, cfg.num_kv_heads, pool.page_size, opts.kv.bf16_layers)
    log.info("KV pool: %s, %d tokens in %.1f MiB (%d B/token, %d B of bf16 ring and sink store per request)",
             fmt.describe(), pool.capacity_tokens, budget / 2**20, token_bytes, window_bytes)

    if fmt.k_center or fmt.k_scale:
        started = time.perf_counter()
        if opts.kv.k_mean_file:
            cal = calibration.load(opts.kv.k_mean_file, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, fmt.k_scale)
        else:
            cal = calibration.measure(runner, calibration.calibration_ids(loaded.tokenizer), fmt.k_center,
                                      fmt.k_scale, opts.kv.k_scale_alpha)
        # the pool renews its per-layer views, which the backend reads each call (and the graphs capture after this)
        pool.k_mean = cal.k_mean.to(device) if fmt.k_center and cal.k_mean is not None else None
        if fmt.k_scale and cal.k_scale is not None:
            for layer, layer_fmt, lam in zip(loaded.model.layers, pool.formats, cal.k_scale.to(device), strict=True):
                layer.k_scale = lam if layer_fmt.k_scale else None
        log.info("K calibration (%s) in %.2fs", opts.kv.k_mean_file or "measured on the built-in text",
                 time.perf_counter() - started)

    context = min(opts.model.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if device.type == "cuda" and opts.decode.cuda_graphs:
        started = time.perf_counter()
        runner.capture_graphs(opts.scheduler.max_running_requests, context)
        log.info("captured decode CUDA graphs for batch sizes up to %d in %.1fs", opts.scheduler.max_running_requests,
                 time.perf_counter() - started)
    if device.type == "cpu" and opts.decode.cpu_compile:
        runner.compile_decode()
    scheduler = Scheduler(pool, opts.scheduler.for_device(device.type == "cuda"), context,
                          frozenset(loaded.tokenizer.eos_token_ids))
    info = EngineInfo(
        model_id=loaded.model_id, tokenizer=loaded.tokenizer, context_length=context, vocab_size=cfg.vocab_size,
        kv_format=fmt.describe(), kv_capacity_tokens=pool.capacity_tokens, page_size=opts.pool.page_size,
        device=device_name(device), kv_bytes_per_token=token_bytes, kv_window_bytes_per_request=window_bytes,
    )
    return LocalEngine(runner, scheduler, info, opts.decode.overlap)


def _no_attention(layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the model ran before its KV pool was attached")
