"""Calibration of the INT4 K encoding, from one pass of a built-in text through the model:

- K scale (--k-scale): lambda [layer, KV head, channel] = max|k_c - mu_c|^a / max|q_c|^(1-a) (q over
  the head's query group), divided by its geometric mean over channels and rounded to a power of two.
  Keys are stored as k / lambda and queries meet them as q lambda: q . k is unchanged (exactly, since
  a power of two scales bf16 exactly), but a channel whose keys are large and whose queries are small
  no longer sets every row's INT4 range. A model without such channels gets lambda = 1.
- K centering (--k-center): the per-(layer, KV head) mean of the (scaled) post-RoPE K. Subtracting a
  fixed vector from every key shifts each query's logits by the same amount, so attention is
  unchanged; what changes is that INT4 no longer spends its range on the constant part.

Deterministic (a fixed text, greedy arithmetic) and fast (one prefill of ~400 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
import torch

from saw_kv.formats import DEFAULT_K_SCALE_ALPHA

if TYPE_CHECKING:
    from saw_worker.config import TokenizerInfo
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


@dataclass
class KCalibration:
    k_mean: torch.Tensor | None  # fp32 [L, Hkv, D]: mean of k / k_scale
    k_scale: torch.Tensor | None  # fp32 [L, Hkv, D]: lambda, powers of two


def k_scale_from_stats(k_absmax: torch.Tensor, q_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda [..., D] from per-channel max |k - mu| and max |q|, geometric mean 1, rounded to 2^n."""
    tiny = 1e-6
    log_lam = alpha * k_absmax.clamp(min=tiny).log2() - (1 - alpha) * q_absmax.clamp(min=tiny).log2()
    log_lam = log_lam - log_lam.mean(-1, keepdim=True)
    return torch.exp2(log_lam.round().clamp(-16, 16))


def calibration_ids(tokenizer: TokenizerInfo) -> list[int]:
    """CALIBRATION_TEXT as the model's token ids."""
    return tokenizers.Tokenizer.from_str(tokenizer.tokenizer_json).encode(CALIBRATION_TEXT).ids


def query_absmax(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """max |q| [Hkv, D] per KV head's channel, over the tokens of q [T, Hq, D] and the head's query group."""
    return q.float().abs().view(q.shape[0], num_kv_heads, -1, q.shape[-1]).amax((0, 2))


def layer_calibration(k: torch.Tensor, q_max: torch.Tensor | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (K mean, K scale), each fp32 [Hkv, D], from its post-RoPE keys k [T, Hkv, D] and, for a K
    scale, query_absmax (None: the scale is 1)."""
    k = k.float()
    lam = torch.ones_like(k[0]) if q_max is None else k_scale_from_stats((k - k.mean(0)).abs().amax(0), q_max, alpha)
    return (k / lam).mean(0), lam


def measure(runner: ModelRunner, token_ids: list[int], center: bool, scale: bool,
            alpha: float = DEFAULT_K_SCALE_ALPHA) -> KCalibration:
    """Run the text through the model once and derive the K mean and scale from each layer's q and K."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(layer_id: int, q: torch.Tensor, k: torch.Tensor) -> None:
        found[layer_id] = layer_calibration(k, query_absmax(q, k.shape[1]) if scale else None, alpha)

    runner.backend.observer = observe
    try:
        runner.score(token_ids)
    finally:
        runner.backend.observer = None
    layers = [found[i] for i in range(runner.pool.num_layers)]
    return KCalibration(torch.stack([m for m, _ in layers]) if center else None,
                        torch.stack([lam for _, lam in layers]) if scale else None)


def load(path: str | Path, num_layers: int, num_kv_heads: int, head_dim: int, scale: bool = False) -> KCalibration:
    """A saved calibration: a dict {"k_mean": ..., "k_scale": ...} (either may be absent), or a bare K mean
    tensor (what --k-mean-file held before the K scale existed). scale: the format has a K scale, which the
    file must hold."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        data = {"k_mean": data}
    want = (num_layers, num_kv_heads, head_dim)
    out: dict[str, torch.Tensor | None] = {}
    for name in ("k_mean", "k_scale"):
        t = data.get(name)
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {want}")
        out[name] = None if t is None else t.float()
    lam = out["k_scale"]
    if lam is None and scale:
        raise ValueError(f"{path} holds no k_scale; give --no-k-scale or a file with one")
    if lam is not None and not bool((lam > 0).all() and (lam == torch.exp2(lam.log2().round())).all()):
        raise ValueError(f"{path}: k_scale must hold positive powers of two")
    return KCalibration(out["k_mean"], lam)
