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


# How a row beyond the output dtype's range is judged, in every verdict's message.
RANGE_RULE = ("an Inf (or saturated value) counts as every value beyond the range with its sign, and its "
              "distance to the exact value is judged by the budget; NaN fails")


def beyond_elements(o_exact, out_dtype):
    """Elements of the exact output that round to +-Inf in ``out_dtype`` (none for float64)."""
    import torch

    if not out_dtype.is_floating_point or out_dtype == torch.float64:
        return torch.zeros(o_exact.shape, dtype=torch.bool, device=o_exact.device)
    return torch.isinf(o_exact.to(out_dtype)) & torch.isfinite(o_exact)


def beyond_range(o_exact, out_dtype):
    """Rows (the last dimension reduced) whose exact output has an element that rounds to
    +-Inf in ``out_dtype``: there the correctly rounded output is infinite and no finite
    error can be measured: range_error measures an overflow's distance instead."""
    return beyond_elements(o_exact, out_dtype).any(-1)


def range_error(o64, o_exact, out_dtype):
    """Elementwise error of an output (float64 copy ``o64``) against the exact value, aware
    of ``out_dtype``'s range. An element at or past the largest finite value (Inf, or a
    saturating kernel's largest finite) stands for every value of its sign beyond that
    value: its error is the distance from the exact value to that set, 0 where the exact
    value is beyond the range with the same sign. NaN stays NaN; elsewhere |o - exact|.
    For float64 outputs an Inf is an Inf error."""
    import torch

    d = (o64 - o_exact).abs()
    if not out_dtype.is_floating_point or out_dtype == torch.float64:
        return d
    fmax = torch.finfo(out_dtype).max
    reach = (fmax - torch.sign(o64) * o_exact).clamp_min(0.0)
    return torch.where(o64.abs() >= fmax, reach, d)


def row_ratios(err, allowed, o64, o_exact, judged, out_dtype):
    """(error / allowed on the judged rows, 0 elsewhere, Inf on a judged row with a NaN or
    with an Inf its budget does not admit), the rows judged fine for finiteness, and the
    rows whose exact value is beyond the output's range. ``err`` is the row's norm of
    range_error: an overflow is admitted where the exact value is beyond the range, or
    where the budget reaches past it (an ill-conditioned row)."""
    import math

    import torch

    beyond = beyond_range(o_exact, out_dtype) & judged
    nan = torch.isnan(o64).any(-1)
    r = torch.where(judged, err / allowed, torch.zeros_like(err))
    ok = torch.isfinite(o64).all(-1) | (~nan & (r <= THRESHOLD))
    return torch.where(judged & ~ok, torch.full_like(err, math.inf), r), ok, beyond
