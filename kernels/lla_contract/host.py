"""Host-side helpers the decode kernels (lla_decode, parallax_decode) share: the device's SM
count, host integer ceiling division and fp32 scratch arrays carved from one allocation.

A leaf like the rest of lla_contract: it imports torch only, so each kernel package still
depends on torch, triton and lla_contract alone.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEFAULT_SMS", "ALIGN_F32", "interpreting", "sm_count", "cdiv", "f32_arrays"]

DEFAULT_SMS = 132  # an H100/H200's SMs, when there is no CUDA device to ask
# Triton specialises a kernel on whether each pointer is 16-byte aligned: arrays carved
# from one allocation start at multiples of this many fp32 entries, as separate
# allocations do, so the same compiled variants run
ALIGN_F32 = 4


def interpreting() -> bool:
    """Triton runs kernels through its interpreter: picks the tile (and so the split size)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# SM counts by CUDA device index: a decode call at a small cache is microseconds of GPU
# work, and the properties query costs a noticeable part of that on every call
_SM_COUNTS: dict[int, int] = {}


def sm_count(device) -> int:
    """The SMs of ``device`` (a torch.device), DEFAULT_SMS off CUDA; queried once a device."""
    if device.type != "cuda":
        return DEFAULT_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNTS.get(idx)
    if n is None:
        n = _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host integers (triton.cdiv is a jit function: from the host, each call
    goes through Triton's argument unwrapping, microseconds a call)."""
    return -(-a // b)


def f32_arrays(k: int, n: int, dev):
    """k flat fp32 arrays of at least n entries from one allocation, each 16-byte aligned."""
    return torch.empty(k, cdiv(n, ALIGN_F32) * ALIGN_F32, device=dev, dtype=torch.float32).unbind(0)
