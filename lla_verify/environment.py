"""The environment a run happened in: versions, devices, and how Triton runs (``lla-verify
info`` prints it; the audit's report records it)."""

from __future__ import annotations

import os
import platform


def triton_mode() -> str:
    """'interpreted' when TRITON_INTERPRET=1, 'compiled' with CUDA, else 'unavailable'."""
    import torch

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "interpreted (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return "compiled (CUDA)"
    return "unavailable (no CUDA device; set TRITON_INTERPRET=1 to run kernels on CPU)"


def collect() -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("lla-verify", "torch", "triton", "numpy", "scipy", "mpmath", "hypothesis", "matplotlib"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    info["cuda"] = torch.version.cuda or "none"
    info["devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else ["cpu"]
    )
    info["triton_mode"] = triton_mode()
    info["cpu_threads"] = torch.get_num_threads()
    return info
