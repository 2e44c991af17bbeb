"""GGUF files: config and tokenizer from metadata, weights dequantized to the target dtype.

llama.cpp's converter permutes the rows of Q and K for the `llama` architecture (its RoPE rotates
interleaved pairs); we undo that so the model's rotate-half RoPE applies. Qwen2/Qwen3 files use
NEOX RoPE and are stored unpermuted.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..models.linear import BLOCK_TYPES, BlockWeight, Int4Parts, Int4Weight
from . import dequant
from .errors import ModelLoadError
from .gguf_int4 import int4_parts

GGUF_MAGIC = b"GGUF"
_SUPPORTED = ("llama", "qwen2", "qwen3")
# Architectures llama.cpp knows that use multi-head latent attention.
_MLA = ("deepseek2", "deepseek3", "kimi", "minicpm3", "glm4moe_lite")

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    ggml_type: int
    data: np.ndarray  # raw bytes (uint8 view of the memory map)


@dataclass
class GGUFFile:
    path: Path
    meta: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    """Little-endian reader over the memory-mapped header. gguf.GGUFReader does the same but builds
    a numpy view per string (seconds for a 150k-token vocabulary); this reads them as bytes."""

    def __init__(self, buf: np.ndarray) -> None:
        self.buf, self.mv, self.pos = buf, memoryview(buf), 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.mv[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            dt = np.dtype(_SCALARS[etype]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return arr.tolist()
        v = self.unpack("<" + _SCALARS[vtype])
        return bool(v) if vtype == _BOOL else v


_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def open_gguf(path: Path) -> GGUFFile:
    """Parse header, metadata and tensor table; tensor data stays memory-mapped."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        c = _Cursor(buf)
        c.pos = 4
        version = c.unpack("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            shape = tuple(c.unpack("<Q") for _ in range(c.unpack("<I")))
            infos.append((name, shape, c.unpack("<I"), c.unpack("<Q")))
        align = int(meta.get("general.alignment", 32))
        base = (c.pos + align - 1) // align * align
        tensors = []
        for name, shape, ggml_type, offset in infos:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            nbytes = math.prod(shape) // block * type_size
            start = base + offset
            if start + nbytes > buf.shape[0]:
                raise ModelLoadError(f"corrupt GGUF file {path}: tensor {name} extends past the end (truncated?)")
            tensors.append(TensorInfo(name, shape, ggml_type, buf[start : start + nbytes]))
    except ModelLoadError:
        raise
    except Exception as e:  # struct.error, bad enum value, bad offsets: all mean a damaged file
        raise ModelLoadError(f"corrupt GGUF file {path}: {type(e).__name__}: {e}") from None
    return GGUFFile(path, meta, tensors)


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    meta, tensor_names = g.meta, {t.name for t in g.tensors}
    arch = str(meta.get("general.architecture", "<none>"))
    if arch not in _SUPPORTED:
        why = " (multi-head latent attention is not supported)" if arch in _MLA else ""
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}{why}; saw runs {', '.join(_SUPPORTED)}")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    if "rope_freqs.weight" in tensor_names:  # Llama 3.1+: per-frequency divisors stored as a tensor
        t = next(t for t in g.tensors if t.name == "rope_freqs.weight")
        scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in t.data.view(np.float32)]}
    elif meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
    )


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name (None: not a model weight, e.g. rope_freqs)."""
    m = _BLK.match(gguf_name)
    if m:
        i, base, kind = m.groups()
        if base not in _BLOCK_NAMES:
            raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{i}.{_BLOCK_NAMES[base]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    if base == "rope_freqs":
        return None
    raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute(w: Tensor, n_head: int) -> Tensor:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` (rows of each head: interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t: TensorInfo, device: torch.device) -> Tensor:
    """float32 tensor in HF layout ([out, in]) on `device`."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize as np_dequantize

    shape = tuple(reversed(t.shape))  # GGUF lists dims fastest-first
    qtype = GGMLQuantizationType(t.ggml_type)
    try:
        # On an accelerator, ship the packed bytes and expand them there. On the CPU gguf's numpy
        # code is as fast (single-threaded numpy beats torch's thread pool on a busy host).
        w = dequant.dequantize(t.data, t.ggml_type, device) if device.type != "cpu" else None
        if w is None:
            rows = math.prod(t.shape[1:])
            a = np.asarray(np_dequantize(t.data.reshape(rows, -1), qtype), dtype=np.float32)
            w = torch.from_numpy(np.array(a, order="C")).to(device)
    except Exception as e:
        raise ModelLoadError(f"cannot dequantize GGUF tensor {t.name} ({qtype.name}): {e}") from None
    return w.reshape(shape)


def iter_weights(
    g: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, int4: bool = False,
    blocks: bool = False,
) -> Iterator[tuple[str, Tensor | Int4Weight | BlockWeight]]:
    """(HF name, tensor) for every model weight, dequantized on `device` and cast to `dtype`.

    blocks (CPU only): a matrix stored in a type the native matvec reads (models/linear.py, BLOCK_TYPES) comes as a
    `BlockWeight`, the dense tensor with the file's blocks [rows, bytes per row].
    int4 (CPU only, where blocks does not apply): a projection weight stored 4-bit affine per group of 32 (Q4_0,
    Q4_1, Q4_K) comes as an `Int4Weight`, the dense tensor with its codes, scales and zeros (gguf_int4.py;
    models/linear.py packs them)."""
    for t in g.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        w = _dequantize(t, device)
        extra: Int4Parts | Tensor | None = None
        if device.type == "cpu" and w.dim() == 2:
            if blocks and t.ggml_type in BLOCK_TYPES:
                extra = torch.from_numpy(np.array(t.data.reshape(w.shape[0], -1)))
            elif int4 and name.endswith("_proj.weight"):
                extra = int4_parts(t.data.reshape(w.shape[0], -1), t.ggml_type, w.numpy())
        if cfg.architecture == "llama":
            heads = None
            if t.name.endswith(("attn_q.weight", "attn_q.bias")):
                heads = cfg.num_heads
            elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
                heads = cfg.num_kv_heads
            if heads is not None:
                w = _unpermute(w, heads)
                if isinstance(extra, Int4Parts):
                    extra = Int4Parts(_unpermute(extra.codes, heads), _unpermute(extra.scale, heads),
                                      _unpermute(extra.zero, heads))
                elif extra is not None:  # whole rows of blocks move as the rows do
                    extra = _unpermute(extra, heads)
        w = w.to(dtype)
        if isinstance(extra, Int4Parts):
            yield name, Int4Weight(w, extra)
        elif extra is not None:
            yield name, BlockWeight(w, t.ggml_type, extra.contiguous())
        else:
            yield name, w
