"""HF folders (config.json + *.safetensors + tokenizer files) and dummy weights from a config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ModelLoadError


def read_config_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelLoadError(f"no config.json at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder} (use --load-format dummy for random weights)")
    return files


def iter_safetensors(files: list[Path], dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, st.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"corrupt safetensors file {f}: {e}") from None
