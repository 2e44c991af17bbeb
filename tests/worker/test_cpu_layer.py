"""The native decoder layer (models/cpu_layer.py on cpu-kernels/src/layer.rs) against the op-by-op CPU path it
fuses (DecoderLayer.forward, the spec): two copies of a tiny model on GGUF blocks of several types, each with its own
engine (pool, CpuBackend, scheduler), decode the same requests, one through the native layers and one through an
attention without native handles; every step's logits and the KV caches must agree bit for bit. Over bf16, INT4
and INT4-BDR caches (K centering, K scale, a bf16 window with sinks, a bf16 layer beside windowed ones), 1 and 3
streams crossing page boundaries, float32 and bf16 models, Llama, Qwen2 (qkv bias) and Qwen3 (q/k norm); the aliases'
GGUFs; and the fallbacks."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q
from test_cpu_matvec import random_blocks
from test_linear import QWEN, SMOLLM2

from saw_kv.formats import KVFormat
from saw_worker.config import ModelConfig
from saw_worker.engine.model_runner import ModelRunner
from saw_worker.engine.request import GenerateParams, Sequence
from saw_worker.engine.scheduler import Scheduler
from saw_worker.kv.cpu_backend import CpuBackend
from saw_worker.kv.pool import KVPool
from saw_worker.models import DecoderLM, cpu_layer
from saw_worker.models.linear import BLOCKS_MAX_ROWS, blocks_supported, pack_blocks
from saw_worker.options import SchedulerOptions

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not blocks_supported(CPU, torch.float32) or not cpu_layer.available(),
                                reason="saw_router._native (with CpuLayer) is not built or the CPU lacks AVX2")

LLAMA = ModelConfig(
    architecture="llama", vocab_size=101, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=64, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
    max_position_embeddings=256, tie_word_embeddings=True, attention_bias=False, qk_norm=False,
)
QWEN2 = dataclasses.replace(LLAMA, architecture="qwen2", attention_bias=True, tie_word_embeddings=False,
                            num_heads=6, num_kv_heads=2)
QWEN3 = dataclasses.replace(LLAMA, architecture="qwen3", qk_norm=True, num_kv_heads=1)
# each projection's row ranges and their types: segments of different types stacked, K-quants where K allows
TYPES = {"qkv_weight": (Q.Q8_0, Q.Q5_0, Q.Q4_1), "o_weight": (Q.Q4_0,), "gate_up_weight": (Q.Q5_1, Q.Q4_K),
         "down_weight": (Q.Q6_K,)}
PAGE = 4


def _model(cfg: ModelConfig, dtype: torch.dtype, k_scale: bool) -> DecoderLM:
    """Random weights, every projection held as random GGUF blocks (the dense copy their dequantization)."""
    model = DecoderLM(cfg, None, device=CPU, dtype=dtype)  # type: ignore[arg-type]
    model.init_random_(seed=3, std=0.3)
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(6)
    for layer in model.layers:
        for attr, types in TYPES.items():
            w = layer.get_parameter(attr)
            rows = [len(r) for r in torch.arange(w.shape[0]).tensor_split(len(types))]
            parts = [random_blocks(t, n, w.shape[1], rng) for t, n in zip(types, rows, strict=True)]
            w.data.copy_(torch.cat([dense for _, dense in parts]).to(dtype))
            layer.packed[attr] = pack_blocks([(int(t), raw) for t, (raw, _) in zip(types, parts, strict=True)],
                                             w.shape[1])
        if layer.qkv_bias is not None:
            layer.qkv_bias.data.copy_(torch.randn(layer.qkv_bias.shape, generator=gen) * 0.1)
        if k_scale:
            layer.k_scale = 2.0 ** torch.randint(-2, 3, (cfg.num_kv_heads, cfg.head_dim), generator=gen).float()
    return model


class Engine:
    """A model with its own pool, CpuBackend and scheduler; `native` False gives the model an attention without
    the native handles (the op-by-op path). Records every step's logits."""

    def __init__(self, model: DecoderLM, fmt: KVFormat, native: bool, bf16_layers: frozenset[int] = frozenset()
                 ) -> None:
        self.model, cfg = model, model.config
        pool = KVPool(fmt, cfg.num_layers, cfg.num_kv_heads, 64, PAGE, CPU, bf16_layers, window_rows=5)
        if fmt.k_center:
            pool.k_mean = torch.randn(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                      generator=torch.Generator().manual_seed(7))
        self.backend = CpuBackend(pool, cfg.head_dim ** -0.5)
        backend = self.backend
        self.model.attention = backend if native else lambda i, q, k, v: backend(i, q, k, v)  # type: ignore[assignment]
        self.runner = ModelRunner(self.model, backend, pool, CPU)
        options = SchedulerOptions(max_running_requests=4, max_prefill_tokens=64, reserve_decode_tokens=0,
                                   prefix_cache=False)
        self.scheduler = Scheduler(pool, options, cfg.max_position_embeddings, frozenset())
        self.logits: list[torch.Tensor] = []
        compute = self.model.compute_logits

        def recorded(hidden: torch.Tensor) -> torch.Tensor:
            out = compute(hidden)
            self.logits.append(out.clone())
            return out

        self.model.compute_logits = recorded  # type: ignore[method-assign]

    def generate(self, prompts: list[list[int]], steps: int) -> list[list[int]]:
        seqs = [Sequence(GenerateParams(f"r{i}", p, max_new_tokens=steps, ignore_eos=True), sink=lambda ev: None,
                         order=i) for i, p in enumerate(prompts)]
        for s in seqs:
            self.scheduler.add(s)
        while (batch := self.scheduler.schedule()) is not None:
            results = self.runner.run(batch)
            self.scheduler.on_ran(batch, [r.token for r in results])
        return [s.token_ids[s.num_prompt:] for s in seqs]


CASES = [
    ("bf16", {}),
    ("int4", {"k_center": True}),
    ("int4-bdr", {"hadamard_order": 64, "k_center": True, "k_scale": True}),
    ("int4-bdr", {"hadamard_order": 32, "rotate_v": True, "window": 4, "sinks": 2}),
    ("int4", {"window": 3, "bf16_layers": (1,)}),  # a bf16 layer (no ring) beside a windowed one
]


def _compare(cfg: ModelConfig, dtype: torch.dtype, kv: str, mods: dict, prompts: list[list[int]],
             steps: int = 9) -> tuple[Engine, Engine]:
    mods = dict(mods)
    k_scale = bool(mods.pop("k_scale", False))
    bf16_layers = frozenset(mods.pop("bf16_layers", ()))
    fmt = KVFormat.make(kv, cfg.head_dim, **mods)
    native, ref = (Engine(_model(cfg, dtype, k_scale), fmt, flag, bf16_layers) for flag in (True, False))
    _agree(native, ref, prompts, steps)
    return native, ref


def _agree(native: Engine, ref: Engine, prompts: list[list[int]], steps: int) -> None:
    """The same greedy tokens, every step's logits and the KV caches bit for bit."""
    tokens = native.generate(prompts, steps)
    assert tokens == ref.generate(prompts, steps), "greedy tokens"
    assert len(native.logits) == len(ref.logits)
    for i, (a, b) in enumerate(zip(native.logits, ref.logits, strict=True)):
        assert torch.equal(a, b), f"step {i}: logits differ by {(a - b).abs().max().item():.3g}"
    pools = (native.runner.pool, ref.runner.pool)
    for a, b in zip(*(p._tensors.values() for p in pools), strict=True):  # noqa: SLF001
        for x, y in zip(a, b, strict=True):
            assert (x is None and y is None) or torch.equal(x, y), "the KV caches"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv,mods", CASES)
@pytest.mark.parametrize("streams", [1, 3])
def test_native_layers_equal_the_op_by_op_path(kv: str, mods: dict, streams: int, dtype: torch.dtype) -> None:
    prompts = [[5 + i + 3 * j for j in range(n)] for i, n in enumerate([3, 4, 9][:streams])]  # across pages of 4
    native, _ = _compare(LLAMA, dtype, kv, mods, prompts)
    assert native.model.native_layers is not None and native.model.native_refused is None


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=lambda c: c.architecture)
def test_native_layers_take_bias_and_qk_norm(cfg: ModelConfig) -> None:
    native, _ = _compare(cfg, torch.float32, "int4-bdr", {"hadamard_order": 64, "k_scale": True}, [[7, 8, 9, 10, 11]])
    assert native.model.native_layers is not None


def test_a_dense_projection_falls_back_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    fmt = KVFormat.make("int4", LLAMA.head_dim)
    engine = Engine(_model(LLAMA, torch.float32, k_scale=False), fmt, native=True)
    del engine.model.layers[1].packed["o_weight"]
    with caplog.at_level(logging.INFO, logger="saw_worker"):
        engine.generate([[4, 5, 6]], 3)
    assert engine.model.native_layers is None
    assert "layer 1: not every projection" in (engine.model.native_refused or "")
    assert sum("op by op" in r.message for r in caplog.records) == 1, "one log line"


def test_steps_the_native_layers_do_not_take_run_op_by_op() -> None:
    fmt = KVFormat.make("bf16", LLAMA.head_dim)
    engine = Engine(_model(LLAMA, torch.float32, k_scale=False), fmt, native=True)
    x = torch.zeros(BLOCKS_MAX_ROWS + 1, LLAMA.hidden_size)
    positions = torch.zeros(BLOCKS_MAX_ROWS + 1, dtype=torch.int64)
    assert cpu_layer.decode(engine.model, x, positions, engine.backend) is None, "more rows than the matvec takes"
    engine.backend.observer = lambda layer_id, q, k: None
    assert engine.backend.native_step() is None, "an observer sees each layer's q and K"


def test_a_new_k_scale_remakes_its_layer() -> None:
    fmt = KVFormat.make("int4-bdr", LLAMA.head_dim, hadamard_order=64)
    native, ref = (Engine(_model(LLAMA, torch.float32, k_scale=False), fmt, flag) for flag in (True, False))
    prompt = [[9, 8, 7, 6]]
    assert native.generate(prompt, 2) == ref.generate(prompt, 2)
    lam = 2.0 ** torch.randint(-2, 3, (LLAMA.num_kv_heads, LLAMA.head_dim), generator=torch.Generator().manual_seed(1))
    for engine in (native, ref):
        engine.model.layers[0].k_scale = lam.float()
    native.logits.clear()
    ref.logits.clear()
    assert native.generate(prompt, 4) == ref.generate(prompt, 4)
    assert all(torch.equal(a, b) for a, b in zip(native.logits, ref.logits, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("path", [SMOLLM2, QWEN], ids=["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_models_decode_the_same_through_the_native_layers(path: Path) -> None:
    """The aliases' GGUFs (Llama with tied embeddings; Qwen2 with its qkv bias, Q4_K_M's mixed types), float32 as
    the worker loads them here, INT4-BDR: 3 streams, 12 steps each."""
    from saw_worker.loader import load_model

    if not path.exists():
        pytest.skip(f"{path} is not cached")
    fmt = KVFormat.make("int4-bdr", 64, hadamard_order=64, k_center=True)
    native, ref = (Engine(load_model(str(path), "auto", CPU, torch.float32, None).model, fmt,  # type: ignore[arg-type]
                          flag) for flag in (True, False))
    _agree(native, ref, [[100 + 7 * i + j for j in range(5 + 3 * i)] for i in range(3)], 12)
    assert native.model.native_layers is not None
