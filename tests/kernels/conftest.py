"""Kernel tests run Triton on the CPU through its interpreter when no CUDA device is present.

The variable must be set before triton is first imported, hence here and not in a fixture.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
