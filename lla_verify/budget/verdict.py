"""The verdict every check reduces to: ratio = max_i error_i / allowed_i, failing above
THRESHOLD, with its cause; and the ledger of every check made in the process, from which
the property suite prints its closing line.
"""

from __future__ import annotations

from dataclasses import dataclass, field


THRESHOLD = 1.0  # a check fails when error / allowed exceeds this
# Every check made in this process: (check, impl, ratio, case). The property suite
# prints "k of N checks over threshold, worst ratio r at <case>" from it.
LEDGER: list = []


def record(check: str, impl: str, ratio: float, case: str) -> None:
    LEDGER.append((check, impl, float(ratio), case))


@dataclass
class Verdict:
    """The outcome of one comparison: a ratio, a pass/fail, and why."""

    check: str
    impl: str
    case: str
    ratio: float
    passed: bool
    cause: str  # "ok" | "implementation" | "conditioning" | "solver" | "non-finite"
    message: str
    worst: tuple | None = None
    n_defined: int = 0
    n_undefined: int = 0
    per_query: dict = field(default_factory=dict)  # tensors, for plots and reports
    summary: dict = field(default_factory=dict)  # scalars for the report row

    def __str__(self) -> str:
        return self.message

def assert_within_budget(verdict: Verdict) -> None:
    """pytest helper: fail with the verdict's message (the failure points at the caller)."""
    __tracebackhide__ = True
    if not verdict.passed:
        raise AssertionError(verdict.message)


def beyond_elements(o_exact, out_dtype):
    """Elements of the exact output that round to +-Inf in ``out_dtype`` (none for float64)."""
    import torch

    if not out_dtype.is_floating_point or out_dtype == torch.float64:
        return torch.zeros(o_exact.shape, dtype=torch.bool, device=o_exact.device)
    return torch.isinf(o_exact.to(out_dtype)) & torch.isfinite(o_exact)


def beyond_range(o_exact, out_dtype):
    """Rows (the last dimension reduced) whose exact output has an element that rounds to
    +-Inf in ``out_dtype``: there the correctly rounded output is infinite and no finite
    error can be measured. row_ratios judges such rows by overflow_ok."""
    return beyond_elements(o_exact, out_dtype).any(-1)


def overflow_ok(o64, o_exact, out_dtype):
    """Per row: no NaN, and every element whose exact value is beyond ``out_dtype``'s range
    came out at least as large as the dtype's largest finite value (Inf, or saturated), with
    the exact value's sign. The other elements of such a row are not judged."""
    import torch

    big = beyond_elements(o_exact, out_dtype)
    if not bool(big.any()):
        return ~torch.isnan(o64).any(-1)
    fmax = torch.finfo(out_dtype).max
    right = (o64.abs() >= fmax) & (torch.sign(o64) == torch.sign(o_exact))
    return ~torch.isnan(o64).any(-1) & (right | ~big).all(-1)


def row_ratios(err, allowed, o64, o_exact, judged, out_dtype):
    """(error / allowed on the judged rows, 0 elsewhere, Inf on a judged row whose output is
    not finite; rows beyond the output's range: 0 if overflow_ok, else Inf), the rows
    judged fine for finiteness, and the rows beyond range."""
    import math

    import torch

    beyond = beyond_range(o_exact, out_dtype) & judged
    ok = torch.where(beyond, overflow_ok(o64, o_exact, out_dtype), torch.isfinite(o64).all(-1))
    r = torch.where(judged & ~beyond, err / allowed, torch.zeros_like(err))
    return torch.where(judged & ~ok, torch.full_like(err, math.inf), r), ok, beyond
