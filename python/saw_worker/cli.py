"""`python -m saw_worker`: one worker process serving the gRPC protocol of proto/saw.proto."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import threading

from saw_worker.builder import WorkerOptions
from saw_worker.engine.process import ProcessEngine
from saw_worker.kv.formats import DEFAULT_SINKS, DEFAULT_WINDOW, HADAMARD_ORDERS, KV_FORMATS
from saw_worker.loader import ModelLoadError

TOKEN_ENV = "SAW_WORKER_TOKEN"
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1.5gib', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _layer_list(text: str) -> frozenset[int]:
    try:
        return frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like 0,1; got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m saw_worker",
        description="saw worker: a paged-KV, continuous-batching engine served over gRPC (proto/saw.proto).",
        epilog="Environment aliases from the saw-int4 SGLang fork: HADAMARD=1 turns --kv int4 (or --kv-cache-dtype "
               "int4) into int4-bdr; HADAMARD_ORDER=b sets --hadamard-order; ROTATE_V=1 sets --rotate-v. Explicit "
               "flags win over these variables.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m, qwen2.5-coder-0.5b), HF safetensors folder, .gguf file, or a config "
                        "folder with --load-format dummy (default: %(default)s)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                   help="how to read weights; dummy = random weights from config.json (default: %(default)s)")
    p.add_argument("--kv", choices=KV_FORMATS, default=None, help="KV-cache format (default: int4-bdr)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "bf16", "int4"], default=None,
                   help="SGLang-style spelling: int4 = --kv int4 (int4-bdr with HADAMARD=1), bf16/auto = --kv bf16")
    p.add_argument("--hadamard-order", type=int, choices=HADAMARD_ORDERS, default=None,
                   help="block size b of the rotation for int4-bdr (default: 128 at head_dim >= 128, else 32; "
                        "docs/accuracy.md)")
    p.add_argument("--rotate-v", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate V as well as K (int4-bdr); the output is rotated back once per head")
    p.add_argument("--k-center", action=argparse.BooleanOptionalAction, default=None,
                   help="subtract the per-(layer, KV head) mean of K before quantizing (default: on for int4 and "
                        "int4-bdr); the mean is measured on a built-in calibration text at load, or read from "
                        "--k-mean-file")
    p.add_argument("--k-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="divide K per channel by a calibrated power-of-two scale and multiply q by it (exact for "
                        "attention; default: on for int4 and int4-bdr)")
    p.add_argument("--k-scale-alpha", type=float, default=WorkerOptions.k_scale_alpha,
                   help="scale = max|K|^a / max|q|^(1-a) per channel (default: %(default)s)")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help=f"attend the W tokens before each step's new ones at bf16 from a per-request window "
                        f"(default: {DEFAULT_WINDOW} for int4 and int4-bdr; 0 = off)")
    p.add_argument("--sinks", type=int, default=None, metavar="S",
                   help=f"attend each request's first S tokens at bf16 from its window's ring (default: "
                        f"{DEFAULT_SINKS} for int4 and int4-bdr; 0 = off; a prefix-cache hit reads them from INT4)")
    p.add_argument("--bf16-layers", type=_layer_list, default=frozenset(), metavar="I,J,...",
                   help="layers whose K/V stay bf16 whatever --kv is (e.g. 0,1: Qwen2's first layers quantize "
                        "worst, docs/accuracy.md)")
    p.add_argument("--k-mean-file", default=None,
                   help="saved K calibration instead of measuring one at load: a torch file holding "
                        "{'k_mean': ..., 'k_scale': ...} or a bare K mean, each [layers, kv_heads, head_dim]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--mem-fraction", type=float, default=WorkerOptions.mem_fraction,
                   help="fraction of GPU memory for weights + KV cache; the pool takes what is left free")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="fixed KV pool size, e.g. 512MiB or 4GiB (default on CPU: 1GiB)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: %(default)s)")
    p.add_argument("--max-running-requests", type=int, default=256, help="decode batch limit (default: %(default)s)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prefill token budget per step; longer prompts are chunked (default: 8192 GPU, 512 CPU)")
    p.add_argument("--reserve-decode-tokens", type=int, default=1024,
                   help="admit a request only while the KV cache keeps room for this many more output tokens "
                        "of it and of every running request (default: %(default)s; 0 = admit greedily)")
    p.add_argument("--context-length", type=int, default=None, help="cap the model's context length")
    p.add_argument("--disable-cuda-graph", action="store_true", help="run decode eagerly on CUDA (for debugging)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=WorkerOptions.overlap,
                   help="launch each decode step before the previous one's tokens reach the host "
                        "(default: on; --no-overlap runs synchronous steps)")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=WorkerOptions.prefix_cache,
                   help="share the K/V of full pages among requests that start with the same tokens "
                        "(default: on)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default: %(default)s)")
    p.add_argument("--unix-socket", default=None, help="listen on this unix socket instead of host:port")
    p.add_argument("--token-file", default=None,
                   help=f"serve only calls that carry the token in this file's first line as 'authorization: "
                        f"Bearer <token>' (default: ${TOKEN_ENV}, which the router sets for the workers it starts; "
                        f"neither: no token is asked for)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def options_from_args(args: argparse.Namespace, env: dict[str, str]) -> WorkerOptions:
    """Flags first, then the SGLang-fork environment aliases, then defaults."""
    kv = args.kv
    if kv is None and args.kv_cache_dtype is not None:
        kv = "int4" if args.kv_cache_dtype == "int4" else "bf16"
    if kv is None:
        kv = "int4" if env.get("HADAMARD") == "0" else "int4-bdr"
    if kv == "int4" and args.kv is None and env.get("HADAMARD") == "1":
        kv = "int4-bdr"
    order = args.hadamard_order or (int(env["HADAMARD_ORDER"]) if env.get("HADAMARD_ORDER") else None)
    rotate_v = args.rotate_v if args.rotate_v is not None else env.get("ROTATE_V", "0") == "1"
    return WorkerOptions(
        model=args.model, load_format=args.load_format, kv=kv, hadamard_order=order, rotate_v=rotate_v,
        k_center=args.k_center, k_scale=args.k_scale, k_scale_alpha=args.k_scale_alpha, window=args.window,
        sinks=args.sinks,
        k_mean_file=args.k_mean_file, bf16_layers=args.bf16_layers, device=args.device,
        mem_fraction=args.mem_fraction,
        kv_cache_memory=args.kv_cache_memory, page_size=args.page_size,
        max_running_requests=args.max_running_requests, max_prefill_tokens=args.max_prefill_tokens,
        reserve_decode_tokens=args.reserve_decode_tokens,
        context_length=args.context_length, cuda_graphs=not args.disable_cuda_graph, overlap=args.overlap,
        prefix_cache=args.prefix_cache,
    )


def worker_token(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """--token-file's first line, else $SAW_WORKER_TOKEN, else None (no token asked for)."""
    if args.token_file is None:
        return env.get(TOKEN_ENV) or None
    with open(args.token_file) as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{args.token_file} holds no token (its first line is empty)")
    return token


async def _serve(args: argparse.Namespace, opts: WorkerOptions, token: str | None) -> None:
    from saw_worker.server import serve

    log = logging.getLogger("saw_worker")
    if token is None:
        log.warning("no worker token (--token-file or $%s): any local process can call this worker", TOKEN_ENV)
    engine = ProcessEngine(opts, logging.getLogger().level)
    engine.start()
    # A signal while the model loads ends both processes at once; from here on it stops them cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    died = threading.Event()

    def on_death() -> None:
        died.set()
        loop.call_soon_threadsafe(stop.set)

    engine.on_death = on_death
    try:
        address = f"unix:{args.unix_socket}" if args.unix_socket else f"{args.host}:{args.port}"
        server = await serve(engine, address, token)
        info = engine.info()
        log.info("ready: %s, kv %s (%d tokens), %s, listening on %s", info.model_id, info.kv_format,
                 info.kv_capacity_tokens, info.device, address)
        await stop.wait()
        await server.stop(grace=5)
    finally:
        # Always: the engine process ignores SIGTERM once serving, and ends when told (or when this one dies).
        engine.shutdown()
    if died.is_set():
        raise RuntimeError("the engine process exited; see the log above")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        opts = options_from_args(args, dict(os.environ))
        # Read, then removed: the processes this one starts need not see it.
        token = worker_token(args, dict(os.environ))
        os.environ.pop(TOKEN_ENV, None)
        asyncio.run(_serve(args, opts, token))
    except (ModelLoadError, ValueError, OSError, RuntimeError) as exc:
        # Load errors (missing/corrupt files, unsupported architectures, bad flags) end here, without a traceback.
        print(f"saw_worker: error: {exc}", file=sys.stderr)
        return 2
    return 0
