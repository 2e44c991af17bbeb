"""The KV format SGLang's processes use, passed as one environment variable.

SGLang starts its scheduler in a spawned process, which imports this package through the plugin entry point but
sees none of the worker's objects; the environment is what it inherits. The worker sets SAW_SGLANG_KV before it
builds `sglang.Engine`; someone running SGLang alone (`--attention-backend saw`) may set it by hand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from saw_kv.formats import KV_FORMATS, KVFormat, default_kv_options

BACKEND = "saw"  # SGLang's --attention-backend name
ENV = "SAW_SGLANG_KV"  # JSON of KVSpec's fields


@dataclass(frozen=True)
class KVSpec:
    """What of saw's format options the SGLang engine carries. The bf16 window, sinks, K centering and K scale
    need saw's scheduler (ring rows per request) or a calibration pass over saw's model: not here yet."""

    kv: str = "int4-bdr"
    hadamard_order: int | None = None  # None: the format's default for the model's head_dim, as --engine saw
    rotate_v: bool = False

    def __post_init__(self) -> None:
        if self.kv not in KV_FORMATS:
            raise ValueError(f"unknown KV format {self.kv!r}; choose one of {', '.join(KV_FORMATS)}")

    def to_env(self) -> str:
        return json.dumps({"kv": self.kv, "hadamard_order": self.hadamard_order, "rotate_v": self.rotate_v})

    def format(self, head_dim: int) -> KVFormat:
        order = self.hadamard_order or default_kv_options(self.kv, head_dim).hadamard_order
        return KVFormat.make(self.kv, head_dim, order, self.rotate_v)


def spec_from_env(env: dict[str, str] | None = None) -> KVSpec:
    """The spec in SAW_SGLANG_KV, else the defaults (int4-bdr, the default Hadamard order)."""
    text = (os.environ if env is None else env).get(ENV)
    if not text:
        return KVSpec()
    try:
        fields = json.loads(text)
        order = fields.get("hadamard_order")
        return KVSpec(str(fields["kv"]), None if order is None else int(order), bool(fields.get("rotate_v", False)))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{ENV}={text!r} is not a saw KV spec: {exc}") from exc
