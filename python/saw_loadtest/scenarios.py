"""Traffic scenarios in genai-bench notation: D(in,out), N(mi,si)/(mo,so), U(a,b)/(c,d)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUM},{_NUM}\)"
_PATTERNS = {
    "D": re.compile(rf"^D{_PAIR}$"),
    "N": re.compile(rf"^N{_PAIR}\s*/\s*{_PAIR}$"),
    "U": re.compile(rf"^U{_PAIR}\s*/\s*{_PAIR}$"),
}


@dataclass(frozen=True)
class Scenario:
    """One request-shape distribution; `sample` draws (input tokens, output tokens)."""

    kind: str  # "D" deterministic, "N" normal (mean, sd), "U" uniform (min, max), inclusive
    input: tuple[float, float]
    output: tuple[float, float]

    def __str__(self) -> str:
        def fmt(pair: tuple[float, float]) -> str:
            return ",".join(f"{v:g}" for v in pair)

        if self.kind == "D":
            return f"D({int(self.input[0])},{int(self.output[0])})"
        return f"{self.kind}({fmt(self.input)})/({fmt(self.output)})"

    @property
    def slug(self) -> str:
        """File-name safe form, e.g. D_256_1024."""
        return re.sub(r"[^0-9A-Za-z.]+", "_", str(self)).strip("_")

    def sample(self, rng: random.Random) -> tuple[int, int]:
        return self._draw(self.input, rng), self._draw(self.output, rng)

    def _draw(self, params: tuple[float, float], rng: random.Random) -> int:
        a, b = params
        if self.kind == "D":
            return int(a)
        if self.kind == "U":
            return rng.randint(int(a), int(b))
        # Normal: rounded and clamped to at least one token, as genai-bench does.
        return max(1, round(rng.gauss(a, b)))

    @property
    def max_input(self) -> int:
        """Largest input a draw can give (normal: mean + 6 sd), for sizing checks."""
        a, b = self.input
        return int(a if self.kind == "D" else b if self.kind == "U" else a + 6 * b)


def parse_scenario(text: str) -> Scenario:
    """Parse `D(256,1024)`, `N(480,240)/(300,150)` or `U(50,100)/(200,300)`; raise ValueError otherwise."""
    s = text.strip()
    pattern = _PATTERNS.get(s[:1].upper())
    m = pattern.match(s[0].upper() + s[1:]) if pattern else None
    if m is None:
        raise ValueError(f"bad scenario {text!r}: expected D(in,out), N(mi,si)/(mo,so) or U(a,b)/(c,d)")
    kind = s[0].upper()
    vals = [float(g) for g in m.groups()]
    if kind == "D":
        inp, out = (vals[0], 0.0), (vals[1], 0.0)
    else:
        inp, out = (vals[0], vals[1]), (vals[2], vals[3])
    if kind in "DU" and any(v != int(v) for v in vals):
        raise ValueError(f"bad scenario {text!r}: {kind} takes whole token counts")
    if inp[0] < 1 or out[0] < 1:
        raise ValueError(f"bad scenario {text!r}: token counts must be >= 1")
    if kind == "U" and (inp[1] < inp[0] or out[1] < out[0]):
        raise ValueError(f"bad scenario {text!r}: U needs min <= max")
    return Scenario(kind, inp, out)
