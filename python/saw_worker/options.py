"""The worker's configuration: one frozen dataclass per concern, each field's default and help written here only.

`python -m saw_worker`'s flags are built from these fields (flags.py, cli.py); build_engine, the scheduler and
the server read the objects. A None default means "chosen at load", as the field's help says.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from saw_kv.formats import DEFAULT_K_SCALE_ALPHA, DEFAULT_SINKS, DEFAULT_WINDOW, HADAMARD_ORDERS, KV_FORMATS
from saw_worker.flags import flag, parse_bytes, parse_layers

CPU_KV_CACHE_BYTES = 1 << 30  # on CPU "free memory" is the whole machine's; take a fixed slice
GPU_PREFILL_TOKENS = 8192
CPU_PREFILL_TOKENS = 512


@dataclass(frozen=True)
class ModelOptions:
    """what to load, and where it runs"""

    name: str = field(default="smollm2-135m", metadata=flag(
        "alias (smollm2-135m, qwen2.5-coder-0.5b), HF safetensors folder, .gguf file, or a config folder with "
        "--load-format dummy", name="--model"))
    load_format: str = field(default="auto", metadata=flag(
        "how to read weights; dummy = random weights from config.json",
        choices=("auto", "safetensors", "gguf", "dummy")))
    device: str = field(default="auto", metadata=flag("auto, cpu, cuda or cuda:N"))
    context_length: int | None = field(default=None, metadata=flag("cap the model's context length", metavar="N"))
    dtype: str = field(default="auto", metadata=flag(
        "weights and activations: auto = bfloat16 on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 or "
        "AMX: 2.4x float32's speed for one decode row on a 2-core EPYC), else float32",
        choices=("auto", "bfloat16", "float32")))
    engine: str = field(default="saw", metadata=flag(
        "what runs the model: saw's own engine (GPU and CPU), or SGLang's model runner and scheduler with saw's KV "
        "pool and kernels (CUDA, SGLang 0.5.11 installed; docs/sglang.md)", choices=("saw", "sglang")))
    cpu_int4_weights: bool = field(default=True, metadata=flag(
        "keep a GGUF's Q4_0/Q4_1/Q4_K projection weights packed too and use torch's int4 kernel for decode steps "
        "of up to 16 rows (bf16 on the CPU; prefill stays dense bf16)"))
    cpu_int8_weights: bool = field(default=True, metadata=flag(
        "keep a GGUF's lm_head and the projections not packed int4 (Q5_0, Q6_K, Q8_0, ...) as int8 too, per-row "
        "scales, and use torch's int8 kernel for decode steps of up to 4 rows (bf16 on the CPU; an HF checkpoint's "
        "weights stay as they are)"))
    cpu_gguf_blocks: bool = field(default=True, metadata=flag(
        "keep a GGUF's quantized projections and lm_head (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K) as the file's blocks "
        "too and use saw's native matvec on them for decode steps of up to 8 rows (bf16 or float32 on an AVX2 CPU; "
        "supersedes the int4 and int8 copies of those weights)"))


@dataclass(frozen=True)
class KVOptions:
    """the KV-cache format and its accuracy levers (docs/accuracy.md)"""

    name: str = field(default="int4-bdr", metadata=flag("KV-cache format", name="--kv", choices=KV_FORMATS))
    hadamard_order: int | None = field(default=None, metadata=flag(
        "block size b of the rotation for int4-bdr (default: 128 at head_dim >= 128, else 32)",
        choices=HADAMARD_ORDERS))
    rotate_v: bool = field(default=False, metadata=flag(
        "rotate V as well as K (int4-bdr); the output is rotated back once per head"))
    k_center: bool | None = field(default=None, metadata=flag(
        "subtract the per-(layer, KV head) mean of K before quantizing (default: on for int4 and int4-bdr); the "
        "mean is measured on a built-in calibration text at load, or read from --k-mean-file"))
    k_scale: bool | None = field(default=None, metadata=flag(
        "divide K per channel by a calibrated power-of-two scale and multiply q by it (exact for attention; "
        "default: on for int4 and int4-bdr)"))
    k_scale_alpha: float = field(default=DEFAULT_K_SCALE_ALPHA, metadata=flag(
        "scale = max|K|^a / max|q|^(1-a) per channel", metavar="A"))
    window: int | None = field(default=None, metadata=flag(
        f"attend the W tokens before each step's new ones at bf16 from a per-request window (default: "
        f"{DEFAULT_WINDOW} for int4 and int4-bdr; 0 = off)", metavar="W"))
    sinks: int | None = field(default=None, metadata=flag(
        f"attend each request's first S tokens at bf16 from its window's ring (default: {DEFAULT_SINKS} for int4 "
        f"and int4-bdr; 0 = off; a prefix-cache hit reads them from INT4)", metavar="S"))
    bf16_layers: frozenset[int] = field(default=frozenset(), metadata=flag(
        "layers whose K/V stay bf16 whatever --kv is (e.g. 0,1: Qwen2's first layers quantize worst)",
        type=parse_layers, metavar="I,J,..."))
    k_mean_file: str | None = field(default=None, metadata=flag(
        "saved K calibration instead of measuring one at load: a torch file holding {'k_mean': ..., "
        "'k_scale': ...} or a bare K mean, each [layers, kv_heads, head_dim]", metavar="FILE"))


@dataclass(frozen=True)
class PoolOptions:
    """the KV pool's memory and page size"""

    mem_fraction: float = field(default=0.90, metadata=flag(
        "fraction of GPU memory for weights + KV cache; the pool takes what is left free (the rest is for "
        "activations and CUDA graphs: 8 GB of an H100 at 0.9)", metavar="F"))
    kv_cache_memory: int | None = field(default=None, metadata=flag(
        f"fixed KV pool size, e.g. 512MiB or 4GiB (default on CPU: {CPU_KV_CACHE_BYTES >> 30}GiB)",
        type=parse_bytes, metavar="BYTES"))
    page_size: int = field(default=16, metadata=flag("tokens per KV page", metavar="N"))


@dataclass(frozen=True)
class SchedulerOptions:
    """continuous batching: admission, prefill chunks, prefix cache"""

    max_running_requests: int = field(default=256, metadata=flag("decode batch limit", metavar="N"))
    max_prefill_tokens: int | None = field(default=None, metadata=flag(
        f"prefill token budget per step; longer prompts are chunked (default: {GPU_PREFILL_TOKENS} GPU, "
        f"{CPU_PREFILL_TOKENS} CPU)", metavar="N"))
    reserve_decode_tokens: int = field(default=1024, metadata=flag(
        "admit a request only while the KV cache keeps room for this many more output tokens of it and of every "
        "running request (0 = admit greedily)", metavar="N"))
    prefix_cache: bool = field(default=True, metadata=flag(
        "share the K/V of full pages among requests that start with the same tokens"))

    def for_device(self, on_gpu: bool) -> SchedulerOptions:
        """These options with the prefill budget filled in for the device when none was given."""
        if self.max_prefill_tokens is not None:
            return self
        return replace(self, max_prefill_tokens=GPU_PREFILL_TOKENS if on_gpu else CPU_PREFILL_TOKENS)


@dataclass(frozen=True)
class DecodeOptions:
    """how decode steps run on the device"""

    cuda_graphs: bool = field(default=True, metadata=flag(
        "run decode eagerly on CUDA (for debugging)", name="--disable-cuda-graph", action="store_false"))
    cpu_compile: bool = field(default=False, metadata=flag(
        "compile the CPU decode forward with torch.compile (inductor, needs a C++ compiler; 1.5-7 min at startup "
        "on 2 cores; not yet faster end to end: bench/results/cpu-vs-llamacpp-2026-12-03b); where compiling "
        "fails, decode runs eagerly"))
    overlap: bool = field(default=True, metadata=flag(
        "launch each decode step before the previous one's tokens reach the host (off: synchronous steps)"))


@dataclass(frozen=True)
class ServerOptions:
    """where the gRPC server listens"""

    host: str = field(default="127.0.0.1", metadata=flag("address to listen on"))
    port: int = field(default=50051, metadata=flag("gRPC port"))
    unix_socket: str | None = field(default=None, metadata=flag("listen on this unix socket instead of host:port",
                                                                 metavar="PATH"))
    log_level: str = field(default="info", metadata=flag("log level", choices=("debug", "info", "warning", "error")))
    token_file: str | None = field(default=None, metadata=flag(
        "serve only calls that carry the token in this file's first line as 'authorization: Bearer <token>' "
        "(default: $SAW_WORKER_TOKEN, which the router sets for the workers it starts; neither: no token is asked "
        "for)", metavar="PATH"))


@dataclass(frozen=True)
class WorkerOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    kv: KVOptions = field(default_factory=KVOptions)
    pool: PoolOptions = field(default_factory=PoolOptions)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    server: ServerOptions = field(default_factory=ServerOptions)
