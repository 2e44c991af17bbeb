"""The perplexity corpus: a pinned list of CPython standard-library sources, cut into token windows.

Files are read from the running interpreter's stdlib folder; their sha256 is pinned (CPython 3.11.7)
so a result can say whether it used the same bytes. A mismatch is reported, not fatal: other Python
versions still work, but their numbers are not comparable with the table in docs/accuracy.md.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# name -> sha256 of CPython 3.11.7's file. Order matters: windows are cut from the concatenation.
PINNED: dict[str, str] = {
    "textwrap.py": "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c",
    "heapq.py": "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9",
    "fractions.py": "b11e850e354808b882d13a70a911c29accd1dbdd41757566704e3b7206c74edb",
    "shlex.py": "42ab6060f316e121e374e6621d8c1c98b8db323903c3df289a810c45a8ae46a7",
    "glob.py": "fa579f8a50a66313d34d339f10be0821c9b4fed6207e8ba8e29ed1c5e119f740",
    "json/decoder.py": "9f02654649816145bc76f8c210a5fe3ba1de142d4d97a1c93105732e747c285b",
    "string.py": "24aeae1f0526250f442022022bf98df9a823b1cb330543ee79e70e44907462e9",
    "graphlib.py": "7bd338c5a475d1101064603d3baa5507446d3c5e73f741f6d6e77c6204c1eb65",
    "queue.py": "f6c37fc37cd7440979f7d22d40ee818fa3b714c573610c08fa52911d541193f0",
    "statistics.py": "889a066f1b8063e73387ceb84018efc507a89b365b56c6afb9cc15b2ed25c2d9",
}


@dataclass(frozen=True)
class SourceFile:
    name: str
    text: str
    sha256: str
    pinned_ok: bool


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(root: Path | None = None) -> list[SourceFile]:
    root = root or stdlib_dir()
    out = []
    for name, want in PINNED.items():
        data = (root / name).read_bytes()
        got = hashlib.sha256(data).hexdigest()
        out.append(SourceFile(name, data.decode("utf-8"), got, got == want))
    return out


def windows(files: list[SourceFile], encode: Callable[[str], list[int]], window: int, count: int) -> list[list[int]]:
    """`count` windows of exactly `window` tokens, spread evenly over the concatenated files (so a short
    run still sees several files rather than only the first)."""
    ids: list[int] = []
    for f in files:
        ids += encode(f.text)
    if len(ids) < window:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one {window}-token window")
    n_max = len(ids) // window
    count = min(count, n_max)
    stride = n_max // count
    return [ids[i * stride * window:(i * stride + 1) * window] for i in range(count)]


def corpus_meta(files: list[SourceFile]) -> dict[str, object]:
    return {"stdlib_dir": str(stdlib_dir()), "files": {f.name: f.sha256 for f in files},
            "matches_pin": all(f.pinned_ok for f in files)}
