"""The KV format SGLang's processes use, passed as one environment variable.

SGLang starts its scheduler in a spawned process, which imports this package through the plugin entry point but
sees none of the worker's objects; the environment is what it inherits. The worker sets SAW_SGLANG_KV before it
builds `sglang.Engine`; someone running SGLang alone (`--attention-backend saw`) may set it by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass

from saw_kv.formats import DEFAULT_K_SCALE_ALPHA, KV_FORMATS, KVFormat

BACKEND = "saw"  # SGLang's --attention-backend name
ENV = "SAW_SGLANG_KV"  # JSON of KVSpec's fields


@dataclass(frozen=True)
class KVSpec:
    """What of saw's format options the SGLang engine carries: the format, its rotation, K centering and the K scale
    (each None: the format's default, as --engine saw). The bf16 window and sinks need saw's scheduler (ring rows
    per request): not here yet. The K calibration comes from a file (k_calibration, a --k-mean-file), or is
    measured by the attention backend on the first prefill, which must be the worker's calibration prompt of
    calibration_tokens tokens (engine.py sends it before it serves)."""

    kv: str = "int4-bdr"
    hadamard_order: int | None = None
    rotate_v: bool = False
    k_center: bool | None = None
    k_scale: bool | None = None
    k_scale_alpha: float = DEFAULT_K_SCALE_ALPHA
    k_calibration: str | None = None
    calibration_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kv not in KV_FORMATS:
            raise ValueError(f"unknown KV format {self.kv!r}; choose one of {', '.join(KV_FORMATS)}")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    def format(self, head_dim: int) -> KVFormat:
        return KVFormat.with_defaults(self.kv, head_dim, self.hadamard_order, self.rotate_v, self.k_center,
                                      self.k_scale, window=0)

    def measures_calibration(self, head_dim: int) -> bool:
        """Whether the backend measures the K calibration (centering or scale asked for, no file given)."""
        fmt = self.format(head_dim)
        return (fmt.k_center or fmt.k_scale) and self.k_calibration is None


def spec_from_env(env: dict[str, str] | None = None) -> KVSpec:
    """The spec in SAW_SGLANG_KV, else the defaults (int4-bdr and its default options)."""
    text = (os.environ if env is None else env).get(ENV)
    if not text:
        return KVSpec()
    try:
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(KVSpec)}
        if not isinstance(fields, dict) or not set(fields) <= known:
            raise ValueError(f"fields other than {sorted(known)}")
        return KVSpec(**fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{ENV}={text!r} is not a saw KV spec: {exc}") from exc
