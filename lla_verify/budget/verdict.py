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
