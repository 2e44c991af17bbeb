"""Run the tests against the source tree (python/ first on sys.path; the compiled saw_router._native from there or
from the installed wheel) and skip GPU tests without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TREE = Path(__file__).resolve().parents[1] / "python"
if not any((TREE / "saw_router").glob("_native*")):
    # the tree holds no build of the router and CPU kernels: take saw_router from the installed wheel, which does
    # (imported before python/ goes first on the path), so the tests of the native parts run
    try:
        import saw_router  # noqa: F401
    except ImportError:
        pass  # not installed either: those tests skip
sys.path.insert(0, str(TREE))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
