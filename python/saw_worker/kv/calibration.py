"""K centering (--k-center): the per-(layer, KV head) mean of post-RoPE K over a calibration text.

Subtracting a fixed vector from every key shifts each query's logits by the same amount, so
attention is unchanged; what changes is that INT4 no longer spends its range on the constant part.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saw_worker.engine.model_runner import ModelRunner

# Prose and code, since served traffic mixes both; a few hundred tokens settle the mean.
CALIBRATION_TEXT = """\
The history of computing is a history of memory. Early machines stored a few thousand words in
mercury delay lines and magnetic drums, and programmers counted every cell. Today a language model
keeps, for every token it has read, a key and a value vector in each layer, and serving many long
conversations at once is limited less by arithmetic than by the bytes this cache occupies.
def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
Question: What is the capital of France? Answer: Paris, which lies on the Seine. The river rises on
the Langres plateau and flows north-west to the English Channel at Le Havre. In 1889 the Eiffel
Tower was completed for the World's Fair; at 300 metres it was the tallest structure in the world.
SELECT name, COUNT(*) AS n FROM orders WHERE created_at >= '2024-01-01' GROUP BY name ORDER BY n DESC;
Photosynthesis converts light energy into chemical energy: carbon dioxide and water become glucose
and oxygen. 3.14159 * r ** 2 gives the area of a circle; 6.022e23 is Avogadro's number.
"""


def measure_k_mean(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    """Run the text through the model and average each layer's post-RoPE K over its tokens."""
    sums: dict[int, torch.Tensor] = {}

    def observe(layer_id: int, k: torch.Tensor) -> None:
        sums[layer_id] = k.float().mean(0)

    runner.attention.observer = observe
    try:
        runner.score(token_ids)
    finally:
        runner.attention.observer = None
    return torch.stack([sums[i] for i in range(runner.pool.num_layers)])


def load_k_mean(path: str | Path, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    k_mean = torch.load(path, map_location="cpu", weights_only=True)
    if tuple(k_mean.shape) != (num_layers, num_kv_heads, head_dim):
        raise ValueError(f"{path}: K mean has shape {tuple(k_mean.shape)}, "
                         f"expected {(num_layers, num_kv_heads, head_dim)}")
    return k_mean.float()
