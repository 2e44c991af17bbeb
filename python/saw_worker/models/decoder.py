"""One decoder-only transformer for Llama (SmolLM2, Llama 3), Qwen2/2.5 and Qwen3.

Differences are flags on ModelConfig: `attention_bias` (Qwen2 qkv bias), `qk_norm` (Qwen3
per-head RMSNorm on q and k before RoPE), `rope_scaling` (Llama 3), `tie_word_embeddings`.
The model works on a flat token batch; attention over cached context is the `Attention`
backend's business. Parameters are created uninitialised (no wasted init on load): fill them
with `load_weights` or `init_random_`.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from . import cpu_fused, cpu_layer
from .attention import Attention
from .linear import (
    BlockWeight,
    Int4Parts,
    Int4Weight,
    Packed,
    PackedBlocks,
    int4_supported,
    int8_supported,
    linear,
    pack,
    pack_blocks,
    pack_int8,
)
from .rope import apply_rope, cos_sin_cache

PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
Part = Int4Parts | BlockWeight  # what a row range of a weight brings for its packed copy


def _param(*shape: int, device: torch.device | None, dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


def fused_ops(x: Tensor) -> ModuleType | None:
    """The one switch: the fused ops (q/k norm + RoPE, SiLU-and-mul, add + RMSNorm) for x's device, or None for the
    torch path. Triton kernels on CUDA (saw_kernels.fused); the native kernels on the CPU (models/cpu_fused.py)
    where saw_router._native is built, except inside torch.compile (which fuses the torch path itself)."""
    if x.is_cuda:
        from saw_kernels import fused  # lazily: needs a GPU build of Triton

        return fused
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and cpu_fused.available():
        return cpu_fused
    return None


class Rope(NamedTuple):
    """A forward's RoPE inputs: the float32 (cos, cos, -sin, sin) cache and positions [T] (fused kernel), and
    the gathered rows cos = (cos, cos), sin = (-sin, sin) [T, 1, D] in the activation dtype (torch path only)."""

    cache: Tensor
    positions: Tensor
    cos: Tensor | None = None
    sin: Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel on CUDA (fp32 statistics); HF casts to bf16 before the weight multiply,
        # this after: a single bf16 rounding apart.
        if fused_ops(x) is cpu_fused:  # one native call instead of torch's composite of ~6 ops
            return cpu_fused.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_norm(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(norm(s), s) for the residual stream s = x + residual (s = x when residual is None). May consume x and
        residual (the CPU's fused op writes its results into them)."""
        if residual is None:
            return self(x), x
        ops = fused_ops(x)
        if ops is not None:  # one launch for the add and the norm
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        s = x + residual
        return self(s), s


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        self.layer_id = layer_id
        self.nq, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, i = cfg.hidden_size, cfg.intermediate_size
        kw = {"device": device, "dtype": dtype}
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, **kw)
        # Merged projections: one GEMM for q|k|v and one for gate|up.
        self.qkv_weight = _param((self.nq + 2 * self.nkv) * self.d, h, **kw)
        self.qkv_bias = _param((self.nq + 2 * self.nkv) * self.d, **kw) if cfg.attention_bias else None
        self.o_weight = _param(h, self.nq * self.d, **kw)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, **kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, **kw) if cfg.qk_norm else None
        self.gate_up_weight = _param(2 * i, h, **kw)
        self.down_weight = _param(h, i, **kw)
        # A KV format's K scale (formats.py, set by calibration): after RoPE q is multiplied by lambda and k
        # divided by it, per (KV head, channel), so the cache and every attention kernel see scaled keys;
        # powers of two, so q . k is exactly unchanged.
        self.k_scale: Tensor | None = None  # fp32 [Hkv, D]
        # The projections' weights packed for a CPU kernel, by parameter name (models/linear.py; the GGUF's blocks or
        # int4 set by DecoderLM.load_weights from what the checkpoint holds, int8 by pack_int8_weights for the
        # rest): few-row forwards read these instead.
        self.packed: dict[str, Packed] = {}

    def on_blocks(self) -> bool:
        """Whether every projection is held as GGUF blocks (the native matvec's and the native layer's weights)."""
        return all(isinstance(self.packed.get(attr), PackedBlocks) for attr in PROJECTIONS)

    def forward(self, x: Tensor, residual: Tensor | None, rope: Rope, attention: Attention) -> tuple[Tensor, Tensor]:
        """x: the previous block's output (the embeddings, with residual None, in layer 0); residual: the stream
        before it. Returns this layer's MLP output and the stream before it: every add is fused into the next norm."""
        t = x.shape[0]
        ops = fused_ops(x)
        normed, residual = self.input_layernorm.add_norm(x, residual)
        qkv = linear(normed, self.qkv_weight, self.packed.get("qkv_weight"), self.qkv_bias)
        q, k, v = qkv.split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        v = v.view(t, self.nkv, self.d)
        if ops is not None:  # one launch: reads q, k from qkv; writes normed, rotated q, k (fp32 in between)
            qw = kw = None
            eps = 0.0
            if self.q_norm is not None and self.k_norm is not None:
                qw, kw, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
            q, k = ops.qk_norm_rope(qkv, self.nq, self.nkv, self.d, qw, kw, eps, rope.cache, rope.positions,
                                    self.k_scale)
        else:
            assert rope.cos is not None and rope.sin is not None
            q, k = q.view(t, self.nq, self.d), k.view(t, self.nkv, self.d)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
            if self.k_scale is not None:
                lam = self.k_scale.to(q.dtype)
                q, k = q * lam.repeat_interleave(self.nq // self.nkv, 0), k / lam
        o = attention(self.layer_id, q, k, v)
        attn_out = linear(o.reshape(t, self.nq * self.d), self.o_weight, self.packed.get("o_weight"))
        normed, residual = self.post_attention_layernorm.add_norm(attn_out, residual)
        gate_up = linear(normed, self.gate_up_weight, self.packed.get("gate_up_weight"))
        if ops is not None:
            h = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return linear(h, self.down_weight, self.packed.get("down_weight")), residual


class DecoderLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attention: Attention,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention = attention
        dev = torch.device(device) if device is not None else None
        kw = {"device": dev, "dtype": dtype}
        self.embed_weight = _param(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, i, **kw) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.lm_head_weight = (
            None if config.tie_word_embeddings else _param(config.vocab_size, config.hidden_size, **kw)
        )
        # the lm_head also packed for few-row logits (CPU, models/linear.py): its GGUF blocks, set by load_weights,
        # or int8, set by pack_int8_weights
        self.lm_head_packed: Packed | None = None
        cache = cos_sin_cache(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings, dev
        )
        self.register_buffer("cos_sin", cache, persistent=False)  # float32, cast per call
        # the layers as native handles for CPU decode steps (models/cpu_layer.py), made on the first such step, or
        # why the model cannot have them; dropped wherever the packed weights change
        self.native_layers: cpu_layer.NativeLayers | None = None
        self.native_refused: str | None = None

    # ---- inference -------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor, attention: Attention | None = None) -> Tensor:
        """input_ids, positions: [T] int64 -> hidden [T, H] with the final norm applied. attention: instead of
        self.attention (the compiled CPU decode step passes an opaque op that calls it, models/compiled.py)."""
        x = F.embedding(input_ids, self.embed_weight)
        native = cpu_layer.decode(self, x, positions, attention or self.attention)
        if native is not None:  # one native call per layer
            return self.norm.add_norm(*native)[0]
        rope = Rope(self.cos_sin, positions)
        if fused_ops(x) is None:  # the torch path gathers the rows once for all layers
            cs = self.cos_sin[positions].to(x.dtype).unsqueeze(1)  # [T, 1, 2D]
            cos, sin = cs.chunk(2, dim=-1)  # (cos, cos), (-sin, sin)
            rope = Rope(self.cos_sin, positions, cos, sin)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, attention or self.attention)
        return self.norm.add_norm(x, residual)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, H] -> logits [N, vocab] float32."""
        w = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        return linear(hidden, w, self.lm_head_packed).float()

    @property
    def native_decode(self) -> bool:
        """Whether a decode step's every weight read is the native kernel's (its GGUF blocks): torch's threads then
        have nothing to do in it but would spin between ops against the kernel's threads (model_runner.py)."""
        return isinstance(self.lm_head_packed, PackedBlocks) and all(layer.on_blocks() for layer in self.layers)

    @torch.no_grad()
    def pack_int8_weights(self) -> None:
        """Keep the lm_head (or the tied embeddings) and every layer projection not packed already (GGUF blocks,
        int4) as int8 too, where the kernel pays (bf16 on the CPU): decode reads half of bf16's bytes for them. The
        loader calls it after the weights are in; writing a weight drops its packed copy."""
        w = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        if not int8_supported(w.device, w.dtype):
            return
        self._drop_native_layers()
        if self.lm_head_packed is None:
            self.lm_head_packed = pack_int8(w)
        for layer in self.layers:
            for attr in PROJECTIONS:
                if attr not in layer.packed:
                    layer.packed[attr] = pack_int8(layer.get_parameter(attr))

    # ---- weights ---------------------------------------------------------------------------
    def init_random_(self, seed: int = 0, std: float = 0.02) -> None:
        """Deterministic random weights (dummy load): small std keeps activations finite in bf16."""
        dev = self.embed_weight.device
        self.lm_head_packed = None
        self._drop_native_layers()
        for layer in self.layers:
            layer.packed.clear()
        g = torch.Generator(device=dev).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                p.data.normal_(0.0, std, generator=g)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Tensor | Int4Weight | BlockWeight]],
                     strict: bool = True) -> None:
        """Copy HF-named tensors (`model.layers.3.self_attn.q_proj.weight`, ...) into the merged params.

        An `Int4Weight` or `BlockWeight` is copied as its dense tensor; where every row range of a projection came
        with int4 parts (the model bf16 on the CPU) or GGUF blocks, the layer also keeps it packed
        (`DecoderLayer.packed`); the lm_head's (or tied embeddings') blocks likewise (`lm_head_packed`).
        strict: every parameter must be written (a tied lm_head may be absent or present)."""
        self.lm_head_packed = None
        self._drop_native_layers()
        written: set[str] = set()
        pending: dict[str, dict[tuple[int, int] | None, Part]] = {}  # projection -> its row ranges' parts
        head = "embed_weight" if self.lm_head_weight is None else "lm_head_weight"
        for name, item in weights:
            target = self._target(name)
            if target is None:
                continue
            w = item.dense if isinstance(item, Int4Weight | BlockWeight) else item
            pname, rows = target
            p = self.get_parameter(pname)
            dst = p.data if rows is None else p.data[rows[0] : rows[1]]
            if tuple(dst.shape) != tuple(w.shape):
                raise ValueError(f"weight {name}: shape {tuple(w.shape)}, model expects {tuple(dst.shape)}")
            dst.copy_(w)
            written.add(pname if rows is None else f"{pname}[{rows[0]}:{rows[1]}]")
            got = item.parts if isinstance(item, Int4Weight) else item if isinstance(item, BlockWeight) else None
            if pname == head:
                self.lm_head_packed = None if got is None else self._pack([got], w.shape[1])
            self._update_packed(pname, rows, got, pending)
        if strict:
            missing = [n for n in self._expected_keys() if n not in written]
            if missing:
                shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
                raise ValueError(f"{len(missing)} model weights missing from the checkpoint: {shown}")

    def _drop_native_layers(self) -> None:
        """Forget the native layers (and a refusal of them): the packed weights they read are about to change."""
        self.native_layers = None
        self.native_refused = None

    def _update_packed(self, pname: str, rows: tuple[int, int] | None, got: Part | None,
                       pending: dict[str, dict[tuple[int, int] | None, Part]]) -> None:
        """After writing rows of parameter `pname`: pack a layer projection once all its row ranges came with int4
        parts or GGUF blocks (`got`), and drop a packed weight that no longer matches the dense one."""
        layer_name, _, attr = pname.rpartition(".")
        if not layer_name.startswith("layers.") or not attr.endswith("_weight"):
            return  # norms, biases, embeddings, lm_head stay dense
        layer = self.get_submodule(layer_name)
        assert isinstance(layer, DecoderLayer)
        layer.packed.pop(attr, None)
        p = self.get_parameter(pname)
        parts = pending.setdefault(pname, {})
        if got is None or isinstance(got, Int4Parts) and not int4_supported(p.device, p.dtype):
            parts.clear()  # a dense row range: this projection stays dense
            return
        parts[rows] = got
        splits = self._row_splits(pname)
        if all(r in parts for r in splits):
            packed = self._pack([parts[r] for r in splits], p.shape[1])
            if packed is not None:
                layer.packed[attr] = packed
            del pending[pname]

    @staticmethod
    def _pack(parts: list[Part], k: int) -> Packed | None:
        """A weight's row ranges, all int4 parts or all GGUF blocks, packed for its kernel (None: no kernel)."""
        if all(isinstance(p, BlockWeight) for p in parts):
            return pack_blocks([(p.ggml_type, p.blocks) for p in parts if isinstance(p, BlockWeight)], k)
        if all(isinstance(p, Int4Parts) for p in parts):
            return pack(Int4Parts.cat([p for p in parts if isinstance(p, Int4Parts)]))
        return None

    def _expected_keys(self) -> list[str]:
        keys = []
        for pname, _ in self.named_parameters():
            for rows in self._row_splits(pname):
                keys.append(pname if rows is None else f"{pname}[{rows[0]}:{rows[1]}]")
        return keys

    def _row_splits(self, pname: str) -> list[tuple[int, int] | None]:
        c = self.config
        if pname.endswith(("qkv_weight", "qkv_bias")):
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        if pname.endswith("gate_up_weight"):
            return [(0, c.intermediate_size), (c.intermediate_size, 2 * c.intermediate_size)]
        return [None]

    def _target(self, name: str) -> tuple[str, tuple[int, int] | None] | None:
        """HF tensor name -> (our parameter name, row range within it) or None to ignore."""
        if name.startswith("model."):
            name = name[len("model.") :]
        if name == "embed_tokens.weight":
            return "embed_weight", None
        if name == "norm.weight":
            return "norm.weight", None
        if name == "lm_head.weight":
            return ("lm_head_weight", None) if self.lm_head_weight is not None else None
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "layers":
            return None  # e.g. rotary_emb.inv_freq in old checkpoints
        i, rest = int(parts[1]), ".".join(parts[2:])
        if rest.endswith("rotary_emb.inv_freq"):
            return None
        pre = f"layers.{i}."
        c = self.config
        q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        table: dict[str, tuple[str, tuple[int, int] | None]] = {
            "self_attn.q_proj.weight": ("qkv_weight", (0, q)),
            "self_attn.k_proj.weight": ("qkv_weight", (q, q + kv)),
            "self_attn.v_proj.weight": ("qkv_weight", (q + kv, q + 2 * kv)),
            "self_attn.q_proj.bias": ("qkv_bias", (0, q)),
            "self_attn.k_proj.bias": ("qkv_bias", (q, q + kv)),
            "self_attn.v_proj.bias": ("qkv_bias", (q + kv, q + 2 * kv)),
            "self_attn.o_proj.weight": ("o_weight", None),
            "self_attn.q_norm.weight": ("q_norm.weight", None),
            "self_attn.k_norm.weight": ("k_norm.weight", None),
            "mlp.gate_proj.weight": ("gate_up_weight", (0, inter)),
            "mlp.up_proj.weight": ("gate_up_weight", (inter, 2 * inter)),
            "mlp.down_proj.weight": ("down_weight", None),
            "input_layernorm.weight": ("input_layernorm.weight", None),
            "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
        }
        hit = table.get(rest)
        if hit is None:
            raise ValueError(f"unexpected weight {name!r}")
        if hit[0] == "qkv_bias" and not c.attention_bias:
            raise ValueError(f"weight {name!r} present but the config has no attention bias")
        if hit[0].startswith(("q_norm", "k_norm")) and not c.qk_norm:
            raise ValueError(f"weight {name!r} present but the config has no q/k norm")
        return pre + hit[0], hit[1]
