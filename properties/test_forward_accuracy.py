"""Forward accuracy: the implementation against the float64 oracle, within the
derived budget (lla_verify.budget), on every family of SPEC 7.

Oracle: lla_verify/oracles/float64.py. Budget: lla_verify/budget/forward.py. Families: lla_verify/registry/cases.py.
"""

import json
from importlib import resources

import pytest
import torch
from hypothesis import given, settings, target

from lla_verify.testing import suite
from lla_verify.budget.forward import check_forward
from lla_verify.budget.verdict import assert_within_budget
from lla_verify.registry.cases import FAMILIES, Case, parse_case

# Regressions found once and checked forever: these, plus what `lla-verify hunt
# --add-regression` stored in properties/regressions.json.
PINNED = [
    Case("offset", {"offset": 100.0, "lam": 10.0}, S=33, D=16, dtype="bfloat16", seed=0),
    Case("gaussian", {"lam": 1e-3}, S=17, D=16, dtype="bfloat16", seed=1),
    Case("large_norm", {"factor": 8.0, "lam": 1e-3}, S=19, D=16, dtype="bfloat16", seed=2),
]
# (the LLA entries: those of the other operators, marked "op", run in test_operator_regressions.py)
PINNED += [parse_case(d["spec"]) for d in json.loads(resources.files(__package__).joinpath("regressions.json").read_text())
           if d.get("op", "lla") == "lla"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_within_budget(impl, device, family):
    suite.require(impl, "forward")
    @settings(max_examples=suite.examples(0.4))
    @given(case=suite.case_strategy(impl, device, families=(family,)))
    def prop(case):
        problem = case.build(device)
        suite.assume_supported(impl, problem)
        o, stats = suite.run(impl, problem, stats=True)
        verdict = check_forward(problem, impl, o, stats=stats)
        suite.set_aside_unless_judged(verdict)
        target(min(verdict.ratio, 1e6), label=f"forward ratio {family}")
        assert_within_budget(verdict)

    prop()


@pytest.mark.parametrize("case", PINNED, ids=lambda c: c.spec())
def test_forward_pinned_regressions(impl, device, case):
    """Each pinned case at its own shape: a D the implementation does not support is
    skipped with the record's reason, never changed."""
    problem = case.build(device)
    suite.skip_unless(impl, "forward", problem)
    o, stats = suite.run(impl, problem, stats=True)
    verdict = check_forward(problem, impl, o, stats=stats)
    assert_within_budget(verdict)
    assert suite.judged_rows(verdict) > 0, f"the pinned case holds no row to a budget: it tests nothing\n{verdict}"


def test_no_nonfinite_output_when_lambda_positive(impl, device):
    """Any finite input with lambda > 0 gives a finite output (every family, its ridge
    parameter over its whole range: strategies.cases(full_ridge=True) says what that
    parameter means for each family)."""
    suite.require(impl, "forward")

    @settings(max_examples=suite.examples(1.0))
    @given(case=suite.case_strategy(impl, device, full_ridge=True))
    def prop(case):
        fam = FAMILIES[case.family]
        problem = case.build(device)
        suite.assume_supported(impl, problem)
        lam_t = problem.lam_tensor
        assert bool((lam_t > 0).all()), f"the strategy drew lambda <= 0 on {case.spec()}"
        o = suite.run(impl, problem)
        bad = ~torch.isfinite(o)
        assert not bool(bad.any()), (
            f"[{impl.name}] non-finite output at {int(bad.any(-1).sum())} queries (first {tuple(bad.nonzero()[0].tolist())}) "
            f"with lambda min {float(lam_t.min()):.3g} > 0 on {case.spec()} ({fam.targets})"
        )

    prop()
