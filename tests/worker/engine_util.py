"""A tiny random model behind a real LocalEngine, and a blocking way to run requests on it."""

from __future__ import annotations

import threading

import torch

from saw_kv.formats import KVFormat
from saw_worker.builder import attention_backend
from saw_worker.config import ModelConfig, TokenizerInfo
from saw_worker.engine.engine import LocalEngine
from saw_worker.engine.interface import EngineInfo
from saw_worker.engine.model_runner import HostBatch, ModelRunner, host_batch
from saw_worker.engine.request import Event, GenerateParams, Sequence
from saw_worker.engine.scheduler import Batch, Chunk, Scheduler
from saw_worker.kv.pool import KVPool
from saw_worker.models import DecoderLM
from saw_worker.options import SchedulerOptions

VOCAB = 97
EOS = 3

TINY = ModelConfig(
    architecture="qwen2", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=64, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6,
    max_position_embeddings=512, tie_word_embeddings=False, attention_bias=True, qk_norm=False,
)


def tiny_engine(kv: str = "int4-bdr", num_pages: int = 64, page_size: int = 4, max_running: int = 64,
                prefill_budget: int = 64, eos: int = EOS, device: str = "cpu", cuda_graphs: bool = False,
                reserve_decode_tokens: int = 0, overlap: bool = True, bf16_layers: frozenset[int] = frozenset(),
                prefix_cache: bool = True, **fmt_kw: object) -> LocalEngine:
    """On CUDA the model runs in bf16 through the Triton kernels; on CPU in fp32 through the reference."""
    torch.manual_seed(0)
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    fmt = KVFormat.make(kv, TINY.head_dim, **fmt_kw)  # type: ignore[arg-type]
    pool = KVPool(fmt, TINY.num_layers, TINY.num_kv_heads, num_pages, page_size, dev, bf16_layers, max_running + 1)
    backend = attention_backend(pool, TINY.head_dim ** -0.5, dev)
    model = DecoderLM(TINY, backend, device=dev, dtype=torch.bfloat16 if on_gpu else torch.float32)
    model.init_random_(seed=1, std=0.3)  # large enough that greedy choices are not near-ties
    runner = ModelRunner(model, backend, pool, dev)
    if cuda_graphs:
        runner.capture_graphs(max_running, TINY.max_position_embeddings)
    options = SchedulerOptions(max_running_requests=max_running, max_prefill_tokens=prefill_budget,
                               reserve_decode_tokens=reserve_decode_tokens, prefix_cache=prefix_cache)
    scheduler = Scheduler(pool, options, TINY.max_position_embeddings, frozenset({eos}))
    tok = TokenizerInfo(tokenizer_json="{}", chat_template="", bos_token="", eos_token="", bos_token_id=None,
                        eos_token_ids=(eos,))
    info = EngineInfo("tiny", tok, TINY.max_position_embeddings, VOCAB, fmt.describe(), pool.capacity_tokens, page_size,
                      "cpu")
    engine = LocalEngine(runner, scheduler, info, overlap)
    engine.start()
    return engine


class Collector:
    """Gathers one request's events; wait() blocks until the last one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.finish is not None:
            self.done.set()

    def wait(self, timeout: float = 60) -> list[int]:
        assert self.done.wait(timeout), "request did not finish"
        return [t for ev in self.events for t in ev.token_ids]

    @property
    def last(self) -> Event:
        return self.events[-1]


def run(engine: LocalEngine, requests: list[GenerateParams]) -> dict[str, list[int]]:
    """Submit all at once (so they batch) and wait for every one."""
    sinks = {r.request_id: Collector() for r in requests}
    for r in requests:
        engine.submit(r, sinks[r.request_id])
    return {rid: c.wait() for rid, c in sinks.items()}


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n,), generator=g).tolist()


def decode_batch(pool: KVPool, lengths: list[int], window_starts: list[int] | None = None) -> HostBatch:
    """A decode step of requests holding `lengths` tokens before it (pages and ring rows taken from pool)."""
    chunks = []
    for i, n in enumerate(lengths):
        seq = Sequence(GenerateParams(f"r{i}", prompt(i, n + 1), max_new_tokens=4), sink=lambda ev: None, order=i)
        seq.pages = pool.allocate(pool.pages_for(n + 1)) or []
        seq.window_row = pool.allocate_row()
        seq.window_start = (window_starts or [0] * len(lengths))[i]
        chunks.append(Chunk(seq, n, n + 1))
    return host_batch(Batch(chunks, is_decode=True), pool)
