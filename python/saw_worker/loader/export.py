"""A GGUF model (alias or file) written out as an HF folder: config.json, model.safetensors (bf16, the weights as
saw dequantizes them) and the tokenizer files. Engines that read HF folders only (`--engine sglang`) serve the
aliases through it; `python -m saw_worker.loader.export MODEL OUT` writes one by hand."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from .aliases import ALIASES, _lock, cache_dir, gguf_path
from .errors import ModelLoadError


def export_hf_folder(gguf: Path, out: Path) -> Path:
    """Write gguf as an HF folder at out (through a temporary sibling, so a half-written folder never stands)."""
    from safetensors.torch import save_file

    from . import gguf_file
    from .tokenizer import tokenizer_from_gguf, write_hf_tokenizer

    g = gguf_file.open_gguf(gguf)
    cfg = gguf_file.config_from_gguf(g)
    try:
        config = cfg.to_hf()
    except ValueError as e:
        raise ModelLoadError(f"{gguf}: {e}") from None
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: w.contiguous() for name, w in gguf_file.iter_weights(g, cfg, torch.bfloat16, torch.device("cpu"))}
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    write_hf_tokenizer(tokenizer_from_gguf(g.meta), tmp, cfg.max_position_embeddings)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def hf_folder_for(spec: str) -> Path | None:
    """An HF folder of the GGUF model spec names, written into the model cache the first time; None when spec is
    not a GGUF model."""
    gguf = gguf_path(spec)
    if gguf is None:
        return None
    out = cache_dir() / "hf" / gguf.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / ".lock"):  # workers started together write it once
        if not (out / "config.json").is_file():
            print(f"saw: writing {gguf.name} as an HF folder at {out}", file=sys.stderr, flush=True)
            export_hf_folder(gguf, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m saw_worker.loader.export MODEL(alias or .gguf) OUT_FOLDER")
    source = gguf_path(sys.argv[1])
    if source is None:
        sys.exit(f"{sys.argv[1]} is neither a model alias ({', '.join(ALIASES)}) nor a .gguf file")
    print(export_hf_folder(source, Path(sys.argv[2])))
