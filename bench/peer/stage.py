"""Build machine (PyPI reachable): pack vLLM 0.26.0 for the offline GPU machine as pieces that travel one at a time.

The GPU image has Python 3.12 and torch 2.11.0+cu130; vLLM 0.26.0 is the release built for that torch. Its wheel
and the dependencies the image lacks (vllm-0.26.0-deps.txt) go into one tar, vLLM itself unpacked, stripped of
what a dense model on a Hopper GPU does not use (FlashAttention-2: FA3 serves Hopper; the Rust frontend; the
SM100 and DeepGEMM kernels) and zstd-compressed, the wheels as they are. The tar is cut into PIECE_MIB pieces:
each run on the GPU machine carries one next to the checkout (a run takes 64 MiB in all).

  python bench/peer/stage.py [--out .peer]      # then: bench/peer/README.md, step 2
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

VLLM = "vllm==0.26.0"
PIECE_MIB = 48
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 26, 24, 17)] + ["manylinux2014_x86_64",
                                                                                        "manylinux1_x86_64"]
# inside the vllm package: not used by a dense model on sm_90
STRIP = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs", "vllm/third_party/fmha_sm100",
         "vllm/third_party/deep_gemm"]
HERE = Path(__file__).resolve().parent


def download(dest: Path, *specs: str) -> None:
    """cp312 manylinux wheels of specs into dest, no dependencies resolved (the lists name them all)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest),
           *specs]
    subprocess.run(cmd, check=True)


def vllm_tree(wheel: Path, site: Path) -> int:
    """Unpack the vLLM wheel into site without the stripped parts; returns the bytes stripped."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    stripped = 0
    for rel in STRIP:
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
    ap.add_argument("--out", type=Path, default=Path(".peer"))
    args = ap.parse_args()
    import zstandard  # a build-machine dependency only: pip install zstandard

    out, work = args.out, args.out / "work"
    shutil.rmtree(out, ignore_errors=True)
    deps = work / "bundle" / "deps"
    deps.mkdir(parents=True)
    download(work / "wheel", VLLM)
    specs = [line.strip() for line in (HERE / "vllm-0.26.0-deps.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    download(deps, *specs, "zstandard")
    stripped = vllm_tree(next((work / "wheel").glob("vllm-*.whl")), work / "site")
    tree = io.BytesIO()
    with tarfile.open(fileobj=tree, mode="w") as t:
        t.add(work / "site", arcname=".")
    compressed = zstandard.ZstdCompressor(level=19, threads=-1).compress(tree.getvalue())
    (work / "bundle" / "vllm.tar.zst").write_bytes(compressed)
    bundle = io.BytesIO()
    with tarfile.open(fileobj=bundle, mode="w") as t:
        t.add(work / "bundle", arcname=".")
    data, size = bundle.getvalue(), PIECE_MIB << 20
    count = -(-len(data) // size)
    for i in range(count):
        (out / f"q{i}").write_bytes(data[i * size:(i + 1) * size])
    (out / "pieces").write_text(f"{count}\n")
    shutil.rmtree(work)
    print(f"vLLM: {len(compressed) >> 20} MiB compressed ({stripped >> 20} MiB stripped), bundle of "
          f"{len(data) >> 20} MiB in {count} pieces of {PIECE_MIB} MiB under {out}/")


if __name__ == "__main__":
    main()
