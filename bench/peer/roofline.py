"""The roofline bound of a serving point: the output tokens/s no engine can beat on this GPU (issue 18, item 3).

    python bench/peer/roofline.py --measure OUT.json      # on the GPU: copy GB/s and bf16 matmul TFLOP/s

A point D(in, out) at concurrency c sends c requests at once (saw-bench --max-requests 1x). Its job takes at
least the prefill FLOPs at the matmul rate plus, per decode step, the larger of (weights + the running
requests' KV bytes) at copy bandwidth and the step's FLOPs at the matmul rate. A pool that holds fewer than c
whole requests (in + out tokens each) runs them in waves of what it holds. The bound is c · out over that time;
bench/peer/table.py reports each row's output tokens/s as a fraction of it. The dense architectures saw's engine
reads (Llama, Qwen2, Qwen3); bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written per second / 1e9
    matmul_tflops: float  # bf16 8192^3 products


@dataclass(frozen=True)
class Model:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    linear_params: int  # every projection and the lm_head: 2 FLOPs per parameter and token
    weight_bytes: int  # what a decode step reads (bf16 weights, embedding rows aside)

    @classmethod
    def from_config(cls, folder: Path) -> Model:
        """A config folder's shapes, as saw reads them (an architecture saw's engine does not run is refused)."""
        from saw_worker.config import ModelConfig

        c = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        linear = c.num_layers * c.projection_params() + c.vocab_size * c.hidden_size
        return cls(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, linear, 2 * linear)

    def kv_elements_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim

    def attention_flops(self, new: int, prefix: int) -> float:
        """Causal attention of `new` tokens after `prefix` cached ones (QK and PV, 2 FLOPs a multiply-add)."""
        return 4 * self.layers * self.q_heads * self.head_dim * (new * prefix + new * (new + 1) / 2)


# KV bytes per element of the peers' --kv-cache-dtype (INT4 per token-head: 4 bits + a fp16 scale per 128)
PEER_KV_BYTES = {"auto": 2.0, "bf16": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0, "int4_per_token_head": 0.5 + 2 / 128}


def kv_bytes_per_token(label: str, model: Model) -> float:
    """KV bytes one token takes in a row's format: a peer's dtype by its label (vllm-fp8, sglang-auto, ...),
    saw's format by name (bf16, int4, int4-bdr; the window's per-request rows are left out)."""
    kind = re.sub(r"^(vllm|sglang)-", "", label.split()[-1])
    if kind in PEER_KV_BYTES:
        return PEER_KV_BYTES[kind] * model.kv_elements_per_token()
    from saw_kv.formats import KVFormat, default_kv_options
    from saw_worker.kv.pool import bytes_per_token

    order = default_kv_options(kind, model.head_dim).hadamard_order
    return bytes_per_token(KVFormat.make(kind, model.head_dim, order, False), model.layers, model.kv_heads)


def bound_tps(model: Model, ceil: Ceilings, prompt: int, output: int, conc: int, kv_bytes: float,
              kv_tokens: int | None) -> float:
    """Output tokens/s bound of c = conc requests of `prompt` + `output` tokens sent at once."""
    # copy GB/s counts the bytes read and written: the traffic HBM sustains, all of it reads in a decode step
    bw, rate = ceil.copy_gbps * 1e9, ceil.matmul_tflops * 1e12
    fit = conc if kv_tokens is None else max(1, min(conc, kv_tokens // (prompt + output)))
    seconds = conc * (2 * model.linear_params * prompt + model.attention_flops(prompt, 0)) / rate
    left = conc
    while left > 0:
        n = min(fit, left)
        for j in range(output):
            step_bytes = model.weight_bytes + n * (prompt + j) * kv_bytes
            step_flops = n * (2 * model.linear_params + model.attention_flops(1, prompt + j))
            seconds += max(step_bytes / bw, step_flops / rate)
        left -= n
    return conc * output / seconds


def scenario_lengths(scenario: str) -> tuple[int, int]:
    """(prompt, output) tokens of a fixed-length scenario D(in,out)."""
    m = re.fullmatch(r"D\((\d+),\s*(\d+)\)", scenario.strip())
    if not m:
        raise ValueError(f"the roofline takes fixed-length scenarios D(in,out), not {scenario!r}")
    return int(m.group(1)), int(m.group(2))


def measure() -> Ceilings:
    """Copy bandwidth and bf16 matmul rate of this GPU, as the kernel and prefill benchmarks measure them."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels_bench import copy_gbps
    from prefill_profile import matmul_tflops

    return Ceilings(round(copy_gbps(2 << 30), 1), round(matmul_tflops(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", type=Path, required=True, help="write this GPU's ceilings here (JSON)")
    out = ap.parse_args().measure
    c = measure()
    out.write_text(json.dumps(c.__dict__))
    print(f"copy {c.copy_gbps:,.0f} GB/s, bf16 matmul {c.matmul_tflops:,.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
