"""Build machine (PyPI reachable): pack a peer engine for the offline GPU machine as pieces that travel one at a time.

The GPU image has Python 3.12 and torch 2.11.0+cu130. Two engines are built for that torch: vLLM 0.26.0 and SGLang
0.5.11 (with sglang-kernel 0.4.2). The engine's own wheels are unpacked into one tree, stripped of what a dense model
on a Hopper GPU does not use and zstd-compressed; the dependencies the image lacks (`<engine>-deps.txt`) go beside
it as wheels. The whole is one tar, cut into PIECE_MIB pieces: each run on the GPU machine carries one next to the
checkout (a run takes 64 MiB in all).

Stripped, vLLM: FlashAttention-2 (FA3 serves Hopper), the Rust frontend, the SM100 and DeepGEMM kernels. SGLang:
sglang-kernel's FlashAttention library (1 GB; saw's kernels attend; `--with-fa3` keeps it, for upstream SGLang's own
runs with its default FA3 backend: 2 more pieces), its SM100 build, FlashMLA (MLA models), DeepGEMM (FP8 GEMMs) and
mscclpp (multi-GPU all-reduce).

  python bench/peer/stage.py [--engine vllm|sglang] [--with-fa3] [--out .peer/ENGINE]   # then: bench/peer/README.md
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PIECE_MIB = 48
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 26, 24, 17)] + ["manylinux2014_x86_64",
                                                                                        "manylinux1_x86_64"]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Peer:
    wheels: tuple[str, ...]  # unpacked into the engine's tree
    deps: str  # file beside this script: the wheels installed as they are
    strip: tuple[str, ...]  # paths inside the tree that a dense model on sm_90 does not use
    fa3: str = ""  # the FlashAttention-3 library among strip, kept by --with-fa3


PEERS = {
    "vllm": Peer(("vllm==0.26.0",), "vllm-0.26.0-deps.txt",
                 ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs", "vllm/third_party/fmha_sm100",
                  "vllm/third_party/deep_gemm")),
    "sglang": Peer(("sglang==0.5.11", "sglang-kernel==0.4.2"), "sglang-0.5.11-deps.txt",
                   ("sgl_kernel/flash_ops.abi3.so", "sgl_kernel/sm100", "sgl_kernel/flashmla_ops.abi3.so",
                    "deep_gemm", "lib", "_mscclpp.cpython-310-x86_64-linux-gnu.so"),
                   fa3="sgl_kernel/flash_ops.abi3.so"),
}


def download(dest: Path, *specs: str) -> None:
    """cp312 manylinux wheels of specs into dest, no dependencies resolved (the lists name them all)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest),
           *specs]
    subprocess.run(cmd, check=True)


def engine_tree(wheels: list[Path], strip: tuple[str, ...], site: Path) -> int:
    """Unpack the engine's wheels into site without the stripped parts; returns the bytes stripped."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    stripped = 0
    for rel in strip:
        path = site / rel
        if path.is_dir():
            stripped += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
        elif path.exists():
            stripped += path.stat().st_size
            path.unlink()
    return stripped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=sorted(PEERS), default="vllm")
    ap.add_argument("--with-fa3", action="store_true", help="sglang: keep sglang-kernel's FlashAttention-3 library")
    ap.add_argument("--out", type=Path, default=None, help="default .peer/ENGINE")
    args = ap.parse_args()
    import zstandard  # a build-machine dependency only: pip install zstandard

    peer = PEERS[args.engine]
    out = args.out or Path(".peer") / args.engine
    work = out / "work"
    shutil.rmtree(out, ignore_errors=True)
    deps = work / "bundle" / "deps"
    deps.mkdir(parents=True)
    download(work / "wheel", *peer.wheels)
    specs = [line.strip() for line in (HERE / peer.deps).read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    download(deps, *specs, "zstandard")
    strip = tuple(p for p in peer.strip if not (args.with_fa3 and p == peer.fa3))
    stripped = engine_tree(sorted((work / "wheel").glob("*.whl")), strip, work / "site")
    tree = io.BytesIO()
    with tarfile.open(fileobj=tree, mode="w") as t:
        t.add(work / "site", arcname=".")
    compressed = zstandard.ZstdCompressor(level=19, threads=-1).compress(tree.getvalue())
    (work / "bundle" / "engine.tar.zst").write_bytes(compressed)
    bundle = io.BytesIO()
    with tarfile.open(fileobj=bundle, mode="w") as t:
        t.add(work / "bundle", arcname=".")
    data, size = bundle.getvalue(), PIECE_MIB << 20
    count = -(-len(data) // size)
    for i in range(count):
        (out / f"q{i}").write_bytes(data[i * size:(i + 1) * size])
    (out / "pieces").write_text(f"{count}\n")
    shutil.rmtree(work)
    print(f"{args.engine}: {len(compressed) >> 20} MiB compressed ({stripped >> 20} MiB stripped), bundle of "
          f"{len(data) >> 20} MiB in {count} pieces of {PIECE_MIB} MiB under {out}/")


if __name__ == "__main__":
    main()
