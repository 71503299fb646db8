"""Forward accuracy: the implementation against the float64 oracle, within the
derived budget (lla_verify.budget), on every family of SPEC 7.

Oracle: lla_verify/oracle.py. Budget: lla_verify/budget.py. Families: lla_verify/cases.py.
"""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, target
from hypothesis import strategies as st

from lla_verify import suite
from lla_verify.budget import assert_within_budget, check_forward
from lla_verify.cases import FAMILIES, Case, parse_case

# Regressions found once and checked forever: these, plus what `lla-verify hunt
# --add-regression` stored in properties/regressions.json.
PINNED = [
    Case("offset", {"offset": 100.0, "lam": 10.0}, S=33, D=16, dtype="bfloat16", seed=0),
    Case("gaussian", {"lam": 1e-3}, S=17, D=16, dtype="bfloat16", seed=1),
    Case("large_norm", {"factor": 8.0, "lam": 1e-3}, S=19, D=16, dtype="bfloat16", seed=2),
]
_STORED = Path(__file__).with_name("regressions.json")
if _STORED.exists():
    PINNED += [parse_case(d["spec"]) for d in json.loads(_STORED.read_text())]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_within_budget(impl, device, family):
    @settings(max_examples=suite.examples(0.4))
    @given(case=suite.case_strategy(impl, device, families=(family,)))
    def prop(case):
        problem = case.build(device)
        suite.skip_unless(impl, "forward", problem)
        o, stats = suite.run(impl, problem, stats=True)
        verdict = check_forward(problem, impl, o, stats=stats)
        target(min(verdict.ratio, 1e6), label=f"forward ratio {family}")
        assert_within_budget(verdict)

    prop()


@pytest.mark.parametrize("case", PINNED, ids=lambda c: c.spec())
def test_forward_pinned_regressions(impl, device, case):
    if torch.device(device).type == "cpu" and impl.head_dims is None:
        case = Case(case.family, case.params, case.B, case.H, case.S, 8, case.dtype, case.seed)
    problem = case.build(device)
    suite.skip_unless(impl, "forward", problem)
    o, stats = suite.run(impl, problem, stats=True)
    assert_within_budget(check_forward(problem, impl, o, stats=stats))


def test_no_nonfinite_output_when_lambda_positive(impl, device):
    """Any finite input with lambda > 0 gives a finite output (every family, extreme params)."""

    @settings(max_examples=suite.examples(1.0))
    @given(case=suite.case_strategy(impl, device), lam=st.floats(1e-12, 1e3))
    def prop(case, lam):
        fam = FAMILIES[case.family]
        params = dict(case.params)
        if "lam" in params:  # the drawn lambda, moved into the family's range (a Case holds no other)
            params["lam"] = fam.param("lam").clip(lam)
        case = Case(case.family, params, case.B, case.H, case.S, case.D, case.dtype, case.seed)
        problem = case.build(device)
        suite.skip_unless(impl, "forward", problem)
        lam_t = problem.lam_tensor
        if not bool((lam_t > 0).all()):
            return  # the family's own lambda can be 0 only through overrides; nothing to check
        o = suite.run(impl, problem)
        bad = ~torch.isfinite(o)
        assert not bool(bad.any()), (
            f"[{impl.name}] non-finite output at {int(bad.any(-1).sum())} queries (first {tuple(bad.nonzero()[0].tolist())}) "
            f"with lambda min {float(lam_t.min()):.3g} > 0 on {case.spec()} ({fam.targets})"
        )

    prop()
