"""The precision arithmetic of the budgets: the unit roundoff of a dtype."""

from __future__ import annotations

import torch

from lla_contract import LLAInputError


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a dtype with p significand bits (round to nearest)."""
    bits = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
    if dtype not in bits:
        raise LLAInputError(f"dtype: no unit roundoff known for {dtype}")
    return 2.0 ** -bits[dtype]
