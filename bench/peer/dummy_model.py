"""A model folder both engines serve with dummy weights: a config.json from configs/ plus the byte-level
tokenizer saw's dummy loader makes (tokenizer.json, tokenizer_config.json with its ChatML template,
generation_config.json), so that saw and the peer count the same prompt tokens and stop on the same ids.

  python bench/peer/dummy_model.py configs/qwen3-8b /tmp/peer-model
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from saw_worker.loader.tokenizer import byte_level_fallback, write_hf_tokenizer  # noqa: E402


def write_model_folder(config_dir: Path, out: Path) -> int:
    """Writes the folder; returns the vocabulary size."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((config_dir / "config.json").read_text())
    shutil.copy(config_dir / "config.json", out / "config.json")
    write_hf_tokenizer(byte_level_fallback(config["vocab_size"]), out, config.get("max_position_embeddings", 40960))
    return config["vocab_size"]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    vocab = write_model_folder(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]} (vocabulary {vocab})")
