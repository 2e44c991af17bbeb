#!/usr/bin/env bash
# The project's whole test suite on a CPU machine: installs what it needs, then Rust and Python checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ".[test]"   # builds the Rust router (maturin) and pulls torch, grpcio, ...

cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked

ruff check python tests bench
# Triton kernels run through the interpreter on CPU (tests/kernels sets TRITON_INTERPRET=1 itself).
python -m pytest -q -ra "$@"
