"""The bench's accuracy column: its case comes from the registry and its verdict is the
audit's (budget.check_forward), so "within budget" in docs/performance.md means what it
means everywhere else. The timing itself needs a GPU and is a command, not a test."""

import torch

from lla_verify.commands.bench import check_case, judge
from lla_verify.registry.cases import parse_case
from lla_verify.oracles.float64 import lla_forward


def _problem():
    case = check_case(S=24, D=16, heads=2, ridge_lambda=0.1, dtype_name="bfloat16")
    return case, case.build()


def test_check_case_is_reproducible_from_its_spec():
    case, prob = _problem()
    again = parse_case(case.spec()).build()
    assert case.family == "gaussian" and prob.q.shape == (1, 2, 24, 16) and prob.q.dtype == torch.bfloat16
    for a, b in ((prob.q, again.q), (prob.k, again.k), (prob.v, again.v)):
        assert torch.equal(a, b)
    assert float(prob.ridge_lambda) == float(torch.tensor(0.1, dtype=torch.float32))


def test_judge_passes_the_rounded_oracle_and_names_an_output_off_by_its_budget():
    case, prob = _problem()
    o64 = lla_forward(prob.q, prob.k, prob.v, ridge_lambda=prob.ridge_lambda, qk_scale=prob.qk_scale)
    good = judge(prob, o64.to(torch.bfloat16))
    assert good.passed and good.ratio <= 1.0, good.message
    # one query of the float64 output moved by 3x what it is allowed (the float64
    # output's own budget): the verdict must fail there, by that ratio, and say where
    allowed = judge(prob, o64).per_query["allowed"]
    bad_o = o64.clone()
    i = 17
    bad_o[0, 1, i, 0] += 3.0 * float(allowed[0, 1, i])
    bad = judge(prob, bad_o, name="planted:bench output off by 3x its budget")
    assert not bad.passed and 2.9 < bad.ratio < 3.1, bad.message
    assert bad.worst == (0, 1, i), bad.message
    assert case.spec() in bad.message and "kappa" in bad.message
