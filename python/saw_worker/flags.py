"""Command-line flags built from option dataclasses: each field's flag, type, default and help come from the field.

A field declares its help with `metadata=flag(...)`; its type gives the argparse type (a bool field becomes a
switch: `--name`, `--name=BOOL` or `--no-name`). Parsers are made with `argument_default=SUPPRESS`, so only the
flags given reach `read_options` and every other field keeps its dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

_FLAG = "flag"  # the field-metadata key
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    help: str
    name: str | None  # None: --field-name
    settings: dict[str, Any]  # argparse settings beyond what the field's type implies


def flag(help: str, name: str | None = None, **settings: Any) -> dict[str, FlagSpec]:
    """Field metadata: the flag's help, and its name or argparse settings where the field's name and type don't
    give them (e.g. `choices`, `metavar`, `type=parse_bytes`)."""
    return {_FLAG: FlagSpec(help, name, settings)}


def boolean(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off, any case: switch flags and switch environment variables."""
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {text!r}")


def parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1.5gib', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def parse_layers(text: str) -> frozenset[int]:
    """'0,1' -> {0, 1}."""
    try:
        return frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like 0,1; got {text!r}") from None


def add_options(parser: argparse.ArgumentParser, options_cls: type) -> None:
    """One argument group per field of options_cls (a dataclass of option dataclasses), titled by the field's
    name and described by its class's docstring."""
    for group_field in dataclasses.fields(options_cls):
        group_cls = group_field.default_factory
        assert isinstance(group_cls, type), f"{options_cls.__name__}.{group_field.name} needs default_factory"
        group = parser.add_argument_group(group_field.name, group_cls.__doc__)
        hints = typing.get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            _add_flag(group, f, _without_none(hints[f.name]))


def read_options(options_cls: type, given: Mapping[str, Any]) -> Any:
    """options_cls built from parsed flags (flag dest -> value); absent flags keep their fields' defaults."""
    groups, used = {}, set()
    for group_field in dataclasses.fields(options_cls):
        group_cls = group_field.default_factory
        values = {f.name: given[_dest(f)] for f in dataclasses.fields(group_cls) if _dest(f) in given}
        used |= {_dest(f) for f in dataclasses.fields(group_cls)}
        groups[group_field.name] = group_cls(**values)
    unknown = set(given) - used
    assert not unknown, f"flags that no option reads: {sorted(unknown)}"
    return options_cls(**groups)


def flag_name(f: dataclasses.Field) -> str:
    spec: FlagSpec = f.metadata[_FLAG]
    return spec.name or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return flag_name(f).removeprefix("--").replace("-", "_")


def _without_none(hint: Any) -> Any:
    """int | None -> int."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field, kind: Any) -> None:
    spec: FlagSpec = f.metadata[_FLAG]
    name, dest = flag_name(f), _dest(f)
    if kind is bool and not spec.settings:
        off = f"--no-{name[2:]}"
        note = f" ({off} turns it off)" if f.default is None else f" (default: {'on' if f.default else 'off'}; {off})"
        group.add_argument(name, dest=dest, nargs="?", const=True, type=boolean, metavar="BOOL", help=spec.help + note)
        group.add_argument(off, dest=dest, action="store_false", help=argparse.SUPPRESS)
        return
    settings = dict(spec.settings)
    if "type" not in settings and "action" not in settings and kind in (int, float, str):
        settings["type"] = kind
    shown = f.default not in (None, dataclasses.MISSING) and f.default != frozenset() and "action" not in settings
    group.add_argument(name, dest=dest, help=spec.help + (f" (default: {f.default})" if shown else ""), **settings)
