"""`load_model`: alias | HF folder | .gguf file | config (dummy) -> a ready DecoderLM + tokenizer.

Every failure a user can cause (missing file, corrupt GGUF/safetensors, unsupported architecture)
surfaces as `ModelLoadError` with a one-line message; the CLI prints it without a traceback.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, TokenizerInfo, UnsupportedArchitectureError
from ..models import Attention, DecoderLM
from ..models.linear import blocks_supported, int4_supported
from .aliases import ALIASES, cache_dir, gguf_path
from .errors import ModelLoadError

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

__all__ = ["ALIASES", "LOAD_FORMATS", "LoadedModel", "ModelLoadError", "cache_dir", "load_model"]


@dataclass
class LoadedModel:
    model_id: str
    config: ModelConfig
    model: DecoderLM
    tokenizer: TokenizerInfo


def load_model(
    spec: str,
    load_format: str,
    device: torch.device,
    dtype: torch.dtype,
    attention: Attention,
    *,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    cpu_int4: bool = True,
    cpu_int8: bool = True,
    cpu_blocks: bool = True,
) -> LoadedModel:
    """Load `spec` (alias, HF folder, .gguf file, or with load_format="dummy" a folder / config.json).

    overrides: ModelConfig fields to replace (e.g. {"num_layers": 2}); dummy loads only make sense of it.
    seed: the random init of dummy weights.
    cpu_int4: keep a GGUF's 4-bit projection weights packed too for few-row forwards, where the model is bf16
    on the CPU (models/linear.py).
    cpu_int8: keep a GGUF's lm_head and projections not packed int4 as int8 too, likewise
    (DecoderLM.pack_int8_weights); an HF checkpoint's weights stay as they are.
    cpu_blocks: keep a GGUF's quantized projections and lm_head as the file's blocks too, for the native matvec
    (bf16 or float32 on an AVX2 CPU, models/linear.py); where it applies, the int4 and int8 copies of those are not
    made.
    """
    fmt = load_format or "auto"
    if fmt not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load format {fmt!r} (choose from {', '.join(LOAD_FORMATS)})")
    device = torch.device(device)
    t0 = time.perf_counter()
    try:
        blocks = cpu_blocks and blocks_supported(device, dtype)
        int4 = cpu_int4 and int4_supported(device, dtype)
        loaded = _load(spec, fmt, device, dtype, attention, overrides or {}, seed, _Packing(int4, cpu_int8, blocks))
    except ModelLoadError as e:
        raise ModelLoadError(_one_line(str(e))) from None
    except UnsupportedArchitectureError as e:
        raise ModelLoadError(_one_line(f"{spec}: {e}")) from None
    except (ValueError, KeyError, OSError, TypeError) as e:  # TypeError: an unknown `overrides` key
        raise ModelLoadError(_one_line(f"cannot load {spec}: {type(e).__name__}: {e}")) from None
    c = loaded.config
    print(
        f"saw: loaded {loaded.model_id} ({c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_heads}/{c.num_kv_heads} heads x {c.head_dim}, {fmt}) on {device} as {dtype} "
        f"in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return loaded


@dataclass(frozen=True)
class _Packing:
    """Which packed copies a GGUF load makes (load_model's cpu_* arguments, where they apply)."""

    int4: bool
    int8: bool
    blocks: bool


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _load(
    spec: str,
    fmt: str,
    device: torch.device,
    dtype: torch.dtype,
    attention: Attention,
    overrides: dict[str, Any],
    seed: int,
    packing: _Packing,
) -> LoadedModel:
    gguf = gguf_path(spec)
    if gguf is not None:
        name = spec if spec in ALIASES else gguf.stem
        return _load_gguf(gguf, name, fmt, device, dtype, attention, overrides, seed, packing)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {spec!r} not found: not a built-in alias ({', '.join(ALIASES)}), file or folder")
    if path.is_file() and fmt == "gguf":
        return _load_gguf(path, path.stem, fmt, device, dtype, attention, overrides, seed, packing)
    if fmt == "gguf":
        raise ModelLoadError(f"--load-format gguf needs a .gguf file, got {path}")
    folder = path.parent if path.is_file() else path
    if path.is_file() and path.name != "config.json":
        raise ModelLoadError(f"{path}: expected a .gguf file, an HF folder, or a config.json")
    return _load_hf(folder, fmt, device, dtype, attention, overrides, seed)


def _build(cfg: ModelConfig, attention: Attention, device: torch.device, dtype: torch.dtype) -> DecoderLM:
    model = DecoderLM(cfg, attention, device=device, dtype=dtype)
    return model.eval()


def _load_gguf(
    path: Path,
    model_id: str,
    fmt: str,
    device: torch.device,
    dtype: torch.dtype,
    attention: Attention,
    overrides: dict[str, Any],
    seed: int,
    packing: _Packing,
) -> LoadedModel:
    from . import gguf_file
    from .tokenizer import tokenizer_from_gguf

    if fmt == "safetensors":
        raise ModelLoadError(f"--load-format safetensors needs an HF folder, got GGUF {path}")
    g = gguf_file.open_gguf(path)
    cfg = gguf_file.config_from_gguf(g)
    cfg = cfg.replace(**overrides) if overrides else cfg
    try:
        tok = tokenizer_from_gguf(g.meta)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ModelLoadError(f"cannot build the tokenizer from {path}: {e}") from None
    model = _build(cfg, attention, device, dtype)
    if fmt == "dummy":
        model.init_random_(seed)
    else:
        model.load_weights(gguf_file.iter_weights(g, cfg, dtype, device, packing.int4, packing.blocks))
    if packing.int8:  # the file is quantized already; a bf16 checkpoint is served as it is
        model.pack_int8_weights()
    return LoadedModel(model_id, cfg, model, tok)


def _load_hf(
    folder: Path,
    fmt: str,
    device: torch.device,
    dtype: torch.dtype,
    attention: Attention,
    overrides: dict[str, Any],
    seed: int,
) -> LoadedModel:
    from .hf import iter_safetensors, read_config_json, safetensors_files
    from .tokenizer import folder_tokenizer

    cfg = ModelConfig.from_hf(read_config_json(folder / "config.json"))
    cfg = cfg.replace(**overrides) if overrides else cfg
    has_tok = (folder / "tokenizer.json").exists()
    if fmt != "dummy" and not has_tok:
        raise ModelLoadError(f"no tokenizer.json in {folder}")
    try:
        tok = folder_tokenizer(folder, cfg.vocab_size)
    except Exception as e:
        raise ModelLoadError(f"cannot read the tokenizer in {folder}: {e}") from None
    model_id = folder.resolve().name
    if fmt == "dummy":
        model = _build(cfg, attention, device, dtype)
        model.init_random_(seed)
    else:
        files = safetensors_files(folder)
        model = _build(cfg, attention, device, dtype)
        model.load_weights(iter_safetensors(files, dtype, device))
    return LoadedModel(model_id, cfg, model, tok)
