"""Helpers shared by the forward and backward kernels of lla_triton.

Kept small and stable: the backward engineer imports from here.
"""

from __future__ import annotations

import os

import torch

# The dtypes and head dims the kernels are compiled for.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# Input precision of tl.dot on fp32 operands (see docs/kernels.md):
#   "ieee"   exact fp32 products, no tensor cores (slow, most accurate)
#   "tf32x3" three TF32 tensor-core products (about fp32 accuracy)
#   "tf32"   one TF32 product (10-bit mantissa; too coarse for CG on an
#            ill-conditioned Sigma_i, kept for speed experiments)
PRECISIONS = ("ieee", "tf32x3", "tf32")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_dtype_ok_for_dot(dtype: torch.dtype) -> bool:
    """Whether tiles of this dtype may go to tl.dot unconverted.

    The interpreter of Triton 3.9 computes garbage for bfloat16 dot operands
    (triton issue 11584), so under the interpreter every tile is upcast to fp32
    first; compiled, 16-bit operands give exact products with fp32 accumulation.
    """
    return not interpreting() or dtype == torch.float32


try:  # Triton 3.x; the name has moved before, so fall back to matching on the class name
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:  # pragma: no cover
    _OutOfResources = None

# Tile configs smaller than any default, tried in order when a default does not fit
# the GPU's shared memory (fp32 operands need twice the bf16 staging buffers).
SMALLER_CONFIGS = ((64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1))
_FITTING: dict = {}


def _is_out_of_resources(exc: Exception) -> bool:
    if _OutOfResources is not None and isinstance(exc, _OutOfResources):
        return True
    return type(exc).__name__ == "OutOfResources"


def launch_fitting(name: str, key, config, launch, *, explicit: bool):
    """``launch(config)``; where the config needs more shared memory than this GPU has,
    the next smaller one of SMALLER_CONFIGS, remembered per (name, key).

    An explicit config (a caller's tile sweep) is never replaced: its error propagates.
    """
    if explicit:
        return launch(tuple(config))
    first = _FITTING.get((name, key), tuple(config))
    order = [first] + [c for c in (tuple(config),) + SMALLER_CONFIGS if c != first]
    last = None
    for cfg in order:
        try:
            out = launch(cfg)
        except Exception as exc:  # noqa: BLE001 - only out-of-resources is retried
            if not _is_out_of_resources(exc):
                raise
            last = exc
            continue
        _FITTING[(name, key)] = cfg
        return out
    raise last
