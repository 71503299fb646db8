"""Where the Triton kernel tests run: the CUDA device, or the CPU through Triton's
interpreter (TRITON_INTERPRET=1), or nowhere (the tests are skipped, saying why)."""

from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> str | None:
    """"cuda" when a CUDA device is visible, "cpu" under the interpreter, else None."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


needs_kernel_device = pytest.mark.skipif(
    kernel_device() is None, reason="needs a CUDA device or TRITON_INTERPRET=1 (CPU interpreter)")
