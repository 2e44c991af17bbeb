"""The saw-int4 SGLang fork's spellings, resolved here only: `--kv-cache-dtype` and the HADAMARD, HADAMARD_ORDER
and ROTATE_V environment variables become the flags they stand for. Explicit flags win. saw-router resolves none
of them: its local workers inherit its environment and get its `--kv-cache-dtype` as given."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from saw_worker.flags import boolean

HELP = ("Environment aliases from the saw-int4 SGLang fork (explicit flags win over them): HADAMARD=1 with "
        "--kv-cache-dtype int4 gives int4-bdr, HADAMARD=0 with no --kv gives int4; HADAMARD_ORDER=b sets "
        "--hadamard-order b; ROTATE_V=1 sets --rotate-v. HADAMARD and ROTATE_V take 1/true/yes/on or "
        "0/false/no/off.")


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SGLang-fork spellings")
    group.add_argument("--kv-cache-dtype", choices=("auto", "bf16", "int4"),
                       help="int4 = --kv int4 (int4-bdr with HADAMARD=1), bf16 or auto = --kv bf16")


def resolve(given: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The parsed flags (dest -> value, only those given) with the aliases replaced by the flags they mean."""
    flags = dict(given)
    dtype = flags.pop("kv_cache_dtype", None)
    hadamard = _switch(env, "HADAMARD")
    if "kv" not in flags:
        if dtype == "int4":
            flags["kv"] = "int4-bdr" if hadamard else "int4"
        elif dtype is not None:
            flags["kv"] = "bf16"
        elif hadamard is False:
            flags["kv"] = "int4"
    order = env.get("HADAMARD_ORDER", "").strip()
    if "hadamard_order" not in flags and order:
        if not order.isdigit():
            raise ValueError(f"HADAMARD_ORDER must be a block size such as 32 or 128, got {order!r}")
        flags["hadamard_order"] = int(order)
    rotate_v = _switch(env, "ROTATE_V")
    if "rotate_v" not in flags and rotate_v is not None:
        flags["rotate_v"] = rotate_v
    return flags


def _switch(env: Mapping[str, str], name: str) -> bool | None:
    """An environment switch: None when unset or empty."""
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return boolean(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
