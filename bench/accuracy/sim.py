"""Simulated KV formats for one-sequence prefill: the worker's reference math (formats.py) plus the
options under study, applied as quantize -> dequantize of K and V before an fp32 causal attention.

Why a simulation and not the engine: the options (attention-sink tokens kept exact, bf16 scales,
V centering, K groups, INT8 K, per-layer exceptions) do not exist in the worker, and a single causal
prefill where every token reads its K/V back from the quantized cache is exactly what the worker's
CPU reference does (kv/reference.py), so the standard formats give the same numbers (checked by
sweep.py --check-engine). K is de-rotated after dequantization: R is orthogonal, so (Rq).(Rk^) = q.(R k^).

K scale (k_scale_alpha, formats.py): lambda = max_t|k - mu|^alpha / max_t,group|q|^(1 - alpha) per
(layer, KV head, channel), calibrated with the K mean on the calibration text (see `k_scale_lambda`);
the quantized vector is R (k / lambda - mu / lambda). Multiplying the dequantized row back by lambda
is the same as meeting it with q lambda: (q lambda) . k^ = q . (lambda k^).

Window W and sinks S: query i reads positions [i - W, i] and [0, S) at bf16, everything else
dequantized, so each query sees what a decode step at position i sees in the worker. The dequantized
rows are put back in the original space (mu added back) so that bf16 and INT4 keys meet a query
with the same logit offset; with every key dequantized, adding mu back is the constant shift q . mu
that softmax ignores. `window_unshifted` leaves the INT4 keys centered (logits
short by q . mu against the bf16 ones) to show what a worker that forgets this would get.

Comparison formats: `int8` = token-wise asymmetric min/max INT8 of K and V (fp16 scale, lo), no
rotation, K centered only with k_center; `fp8` = e4m3 with one scale per layer for K and one for V, max|x| / 448 over
the calibration text (values past it saturate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from saw_kv.formats import EPS, rotate
from saw_worker.kv.calibration import k_scale_from_stats

FP8_MAX = 448.0


@dataclass(frozen=True)
class SimFormat:
    name: str  # bf16 | int4 | int4-bdr | int8 | fp8
    order: int = 64
    rotate_v: bool = False
    k_center: bool = False
    param_dtype: torch.dtype = torch.float16
    sink: int = 0  # first tokens kept in bf16
    v_center: bool = False  # subtract the V mean, add it back to the output once per head
    k_group: int = 0  # 0 = whole row; else min/scale per group of k_group channels (K only)
    k_bits: int = 4
    exact_layers: frozenset[int] = field(default_factory=frozenset)  # layers kept in bf16
    exact_k_layers: frozenset[int] = field(default_factory=frozenset)  # layers whose K is kept in bf16
    k_scale_alpha: float | None = None  # per-channel K scale lambda (None = off)
    k_scale_pow2: bool = True  # round lambda to the nearest power of two
    window: int = 0  # W: the W positions before each query (and the query's own) read at bf16
    window_unshifted: bool = False  # diagnostic: bf16 window keys raw, INT4 keys centered (no q.mu fix)
    q_perturb: float = 0.0  # noise replicate: q * (1 + q_perturb) before attention (see sweep.py)

    @property
    def quantized(self) -> bool:
        return self.name != "bf16"

    def bytes_per_token_head(self, d: int, num_layers: int = 1) -> float:
        """K + V bytes of one (token, KV head), averaged over layers (bf16 exceptions included; the
        sinks' and the window's cost is per request, not per token, and left out)."""
        if self.name == "bf16":
            return 4.0 * d
        if self.name == "fp8":
            return 2.0 * d  # plus 2 scales per layer
        if self.name == "int8":
            return 2.0 * (d + 4)
        groups = d // self.k_group if self.k_group else 1
        k, v = d * self.k_bits / 8 + 4 * groups, d / 2 + 4
        n_full, n_k = len(self.exact_layers), len(self.exact_k_layers - self.exact_layers)
        n_q = num_layers - n_full - n_k
        return (n_q * (k + v) + n_full * 4 * d + n_k * (2 * d + v)) / max(num_layers, n_full + n_k)

    def window_bytes_per_head(self, d: int) -> int:
        """bf16 K + V of the window and sinks, per request and KV head (per layer)."""
        return (self.window + self.sink) * 4 * d


def fake_quant(x: torch.Tensor, bits: int, group: int, param_dtype: torch.dtype) -> torch.Tensor:
    """Token-wise asymmetric min/max quantization of rows x[..., D] (groups of `group`), dequantized."""
    d = x.shape[-1]
    g = group or d
    xs = x.float().reshape(*x.shape[:-1], d // g, g)
    levels = 2**bits - 1
    lo = xs.amin(-1, keepdim=True)
    scale = torch.clamp(xs.amax(-1, keepdim=True) - lo, min=EPS) / levels
    scale, lo = scale.to(param_dtype).float(), lo.to(param_dtype).float()
    q = torch.clamp(torch.round((xs - lo) / scale), 0, levels)
    return (q * scale + lo).reshape(x.shape)


def fake_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 with one scale (x / scale saturates at +-448), dequantized."""
    y = torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return y.float() * scale


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def k_scale_lambda(k_absmax: torch.Tensor, q_absmax: torch.Tensor, alpha: float, pow2: bool) -> torch.Tensor:
    """lambda [..., Hkv, D] from max_t|k - mu| and max_{t, group}|q| [..., Hkv, D]: k^alpha / q^(1 - alpha),
    divided by its geometric mean over channels; with pow2 the worker's own calibration (rounded to 2**n)."""
    if pow2:
        return k_scale_from_stats(k_absmax, q_absmax, alpha)
    log = alpha * k_absmax.clamp(min=1e-6).log() - (1 - alpha) * q_absmax.clamp(min=1e-6).log()
    return (log - log.mean(-1, keepdim=True)).exp()


@dataclass
class Calibration:
    """Per-layer statistics of a bf16 pass over the calibration text."""

    k_mean: torch.Tensor  # [L, Hkv, D]
    v_mean: torch.Tensor  # [L, Hkv, D]
    k_absmax: torch.Tensor  # [L, Hkv, D] max_t |k - k_mean|
    q_absmax: torch.Tensor  # [L, Hkv, D] max over tokens and the KV head's query group of |q|
    k_layer_max: torch.Tensor  # [L] max |k| (FP8 scale = this / 448)
    v_layer_max: torch.Tensor  # [L]

    @staticmethod
    def from_observed(obs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Calibration:
        """obs[layer] = (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) post-RoPE."""
        ks, vs, kmx, qmx, kl, vl = [], [], [], [], [], []
        for i in range(len(obs)):
            q, k, v = (x.float() for x in obs[i])
            mu = k.mean(0)
            hkv = k.shape[1]
            ks.append(mu)
            vs.append(v.mean(0))
            kmx.append((k - mu).abs().amax(0))
            qmx.append(q.abs().amax(0).reshape(hkv, q.shape[1] // hkv, -1).amax(1))
            kl.append(k.abs().amax())
            vl.append(v.abs().amax())
        st = torch.stack
        return Calibration(st(ks), st(vs), st(kmx), st(qmx), st(kl), st(vl))


class SimAttention:
    """Attention callable for DecoderLM: positions 0..T-1 of one sequence."""

    def __init__(self, fmt: SimFormat, sm_scale: float, k_mean: torch.Tensor | None = None,
                 v_mean: torch.Tensor | None = None, calib: Calibration | None = None) -> None:
        self.fmt, self.sm_scale = fmt, sm_scale
        self.k_mean, self.v_mean = k_mean, v_mean
        self.calib = calib  # needed for k_scale_alpha and fp8
        self.observer = None  # callable(layer_id, k, v) for statistics
        self.qkv_observer = None  # callable(layer_id, q, k, v), post-RoPE
        self._lambda: dict[tuple[float, bool], torch.Tensor] = {}

    def k_scale(self, layer: int) -> torch.Tensor | None:
        f = self.fmt
        if f.k_scale_alpha is None:
            return None
        if self.calib is None:
            raise ValueError("k_scale_alpha needs a Calibration")
        key = (f.k_scale_alpha, f.k_scale_pow2)
        if key not in self._lambda:
            self._lambda[key] = k_scale_lambda(self.calib.k_absmax, self.calib.q_absmax, *key)
        return self._lambda[key][layer]

    def _kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the quantized cache gives back for K and V, in the original space (see module doc)."""
        f = self.fmt
        if f.name == "bf16" or layer in f.exact_layers:
            return bf16(k), bf16(v)
        if f.name == "fp8":
            c = self.calib
            return (fake_fp8(k, float(c.k_layer_max[layer]) / FP8_MAX),
                    fake_fp8(v, float(c.v_layer_max[layer]) / FP8_MAX))
        if f.name == "int8":
            mu = self.k_mean[layer] if f.k_center and self.k_mean is not None else 0.0
            return fake_quant(k - mu, 8, 0, f.param_dtype) + mu, fake_quant(v, 8, 0, f.param_dtype)
        lam = self.k_scale(layer)
        mu = self.k_mean[layer] if f.k_center and self.k_mean is not None else None
        kc = k.float() - mu if mu is not None else k.float()
        if lam is not None:
            kc = kc / lam  # == k / lambda - mean(k / lambda)
        rot = f.name == "int4-bdr"
        kh = fake_quant(rotate(kc, f.order) if rot else kc, f.k_bits, f.k_group, f.param_dtype)
        kh = rotate(kh, f.order) if rot else kh
        if layer in f.exact_k_layers:
            kh = bf16(kc)
        if lam is not None:
            kh = kh * lam
        if mu is not None and not f.window_unshifted:
            kh = kh + mu
        vx = v.float()
        vm = self.v_mean[layer] if f.v_center and self.v_mean is not None else None
        if vm is not None:
            vx = vx - vm
        vx = rotate(vx, f.order) if f.rotate_v else vx
        vh = fake_quant(vx, 4, 0, f.param_dtype)
        vh = rotate(vh, f.order) if f.rotate_v else vh
        if vm is not None:
            vh = vh + vm  # == adding vm to the output once: attention weights sum to 1
        return kh, vh

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(layer_id, k, v)
        if self.qkv_observer is not None:
            self.qkv_observer(layer_id, q, k, v)
        f = self.fmt
        if f.q_perturb:
            q = q * (1 + f.q_perturb)
        kh, vh = self._kv(layer_id, k, v)
        group = q.shape[1] // k.shape[1]
        qh = q.float().transpose(0, 1)
        kh = kh.repeat_interleave(group, 1).transpose(0, 1)
        vh = vh.repeat_interleave(group, 1).transpose(0, 1)
        if not (f.quantized and layer_id not in f.exact_layers and (f.window or f.sink)):
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.sm_scale)
            return o.transpose(0, 1).to(q.dtype)
        # Sinks: positions < S read at bf16 by every query. Window: query i reads [i - W, i] at bf16.
        kb = bf16(k).repeat_interleave(group, 1).transpose(0, 1)
        vb = bf16(v).repeat_interleave(group, 1).transpose(0, 1)
        if f.sink:
            kh, vh = kh.clone(), vh.clone()
            kh[:, : f.sink], vh[:, : f.sink] = kb[:, : f.sink], vb[:, : f.sink]
        if not f.window:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.sm_scale)
        else:
            o = windowed_attention(qh, kh, vh, kb, vb, f.window, self.sm_scale)
        return o.transpose(0, 1).to(q.dtype)


def windowed_attention(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                       w: int, sm_scale: float, chunk: int = 128) -> torch.Tensor:
    """Causal attention [H, T, D] where query i reads keys/values j in [i - W, i] from (kb, vb) and
    every older j from (kh, vh). Queries go in chunks: for a chunk [a, b) keys below a - W are all
    dequantized, only the band [a - W, b) needs the per-(i, j) choice."""
    t = q.shape[1]
    out = torch.empty_like(q)
    for a in range(0, t, chunk):
        b = min(a + chunk, t)
        lo = max(0, a - w)
        qc = q[:, a:b]
        i = torch.arange(a, b)[:, None]
        j = torch.arange(lo, b)[None, :]
        exact = j >= i - w
        s_near = torch.where(exact, qc @ kb[:, lo:b].transpose(1, 2), qc @ kh[:, lo:b].transpose(1, 2))
        s_near = s_near.masked_fill(j > i, float("-inf"))
        s = torch.cat([qc @ kh[:, :lo].transpose(1, 2), s_near], -1) if lo else s_near
        p = torch.softmax(s * sm_scale, -1)
        p_far, p_near = p[..., :lo], p[..., lo:]
        pe = p_near * exact
        o = pe @ vb[:, lo:b] + (p_near - pe) @ vh[:, lo:b]
        if lo:
            o = o + p_far @ vh[:, :lo]
        out[:, a:b] = o
    return out
