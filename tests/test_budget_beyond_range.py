"""Rows whose exact output lies beyond the output dtype's range (lla_verify/budget/verdict.py):
the correctly rounded output is infinite there. An output element that overflowed (Inf, or
saturated) stands for every value of its sign past the range, its error is the distance from
the exact value to those values, and the row is judged by its budget like any other; NaN
fails."""

from __future__ import annotations

import pytest
import torch

from lla_verify.budget.parallax import check_parallax_decode, parallax_budget
from lla_verify.budget.verdict import beyond_range, range_error, row_ratios
from lla_verify.registry.cases import parse_case


def test_beyond_range_is_what_rounds_to_inf():
    x = torch.tensor([[7.0e4, 1.0], [6.0e4, 1.0], [65519.0, 0.0], [65520.0, 0.0], [-1e6, 0.0]], dtype=torch.float64)
    assert beyond_range(x, torch.float16).tolist() == [True, False, False, True, True]
    assert not beyond_range(x, torch.float64).any()
    assert not beyond_range(x, torch.bfloat16).any()


def test_range_error_measures_an_overflow_to_the_values_it_stands_for():
    exact = torch.tensor([[7.0e4, 1.0], [-3.0e4, 1.0]], dtype=torch.float64)

    def err(got, dtype=torch.float16):
        return range_error(torch.tensor(got, dtype=torch.float64), exact, dtype).tolist()

    inf, fmax = float("inf"), 65504.0
    assert err([[inf, 1.5], [-3.0e4, 1.0]]) == [[0.0, 0.5], [0.0, 0.0]]  # the right overflow
    assert err([[fmax, 1.0], [-fmax, 1.0]]) == [[0.0, 0.0], [fmax - 3.0e4, 0.0]]  # saturated
    assert err([[-inf, 1.0], [inf, 1.0]]) == [[fmax + 7.0e4, 0.0], [fmax + 3.0e4, 0.0]]  # wrong sign
    assert err([[65472.0, 1.0], [-3.0e4, 1.0]])[0][0] == 7.0e4 - 65472.0  # finite: |o - exact|
    nan = err([[float("nan"), 1.0], [-3.0e4, 1.0]])[0][0]
    assert nan != nan
    assert err([[inf, 1.0], [-3.0e4, 1.0]], torch.float64)[0][0] == inf  # float64 has no overflow to admit


def test_a_row_beyond_the_range_is_judged_by_its_budget():
    # an ill-conditioned row's allowance can exceed the gap between the exact value and
    # the range's end (an fp16 dk of 3.5e5 allowed 1.3e7 at kappa 4e6: the regressions
    # duplicates:lam=1e-05,pool=1 and pool=14 of properties/regressions.json)
    exact = torch.tensor([[7.0e4, 1.0, -1.0e4]], dtype=torch.float64)
    judged = torch.tensor([True])

    def ratio(got, allowed):
        got = torch.tensor([got], dtype=torch.float64)
        e = range_error(got, exact, torch.float16).norm(dim=-1)
        return float(row_ratios(e, torch.tensor([allowed], dtype=torch.float64), got, exact, judged,
                                torch.float16)[0][0])

    inf = float("inf")
    assert 0.4 < ratio([65472.0, 1.0, -1.0e4], 1e4) < 0.5
    assert ratio([65472.0, 1.0, -1.0e4], 10.0) > 400  # the same answer, a tight budget: FAIL
    assert ratio([0.0, 1.0, -1.0e4], 1e4) > 1
    assert ratio([inf, 1.0, -1.0e4], 10.0) == 0.0
    assert ratio([65504.0, 1.0, -1.0e4], 10.0) == 0.0  # saturated with the exact sign
    assert ratio([-inf, 1.0, -1.0e4], 1e4) == inf  # the wrong sign
    assert ratio([inf, 1.0, inf], 1e4) == inf  # an Inf 7.6e4 from an in-range value
    assert 0.5 < ratio([inf, 1.0, inf], 1e5) < 1  # ... that a wide budget admits
    assert ratio([inf, float("nan"), -1.0e4], 1e9) == inf


# found on an H200 (properties/test_decode.py::test_ragged_batch_decode, seed 1): a probe of
# size 4 takes the exact output of this fp16 problem's row 62 to 7.3e4, beyond fp16's 65504,
# and the check divided an Inf error by an Inf allowance (ratio NaN)
CASE = "large_norm:factor=100,lam=1:B=1,H=1,S=73,D=128,dtype=float16,seed=4"


@pytest.fixture(scope="module")
def overflowing():
    p = parse_case(CASE).build("cpu")
    gen = torch.Generator().manual_seed(0)
    r = (4.0 * torch.randn(p.q.shape, generator=gen, dtype=torch.float64)).to(p.q.dtype)
    pb = parallax_budget(p.q, p.k, p.v, r, qk_scale=p.qk_scale, out_dtype=torch.float16)
    row = pb.o[0, 0, 62]
    assert beyond_range(row, torch.float16), "the case no longer overflows fp16: pick another"
    return p, r, pb


def _judge(overflowing, row, impl="exact-rounded"):
    p, r, pb = overflowing
    o = row.to(torch.float16)[None, None]
    return check_parallax_decode(p.q, p.k, p.v, r, o, impl=impl, case=CASE, qk_scale=p.qk_scale,
                                 lengths=torch.tensor([63]), pb=pb)


def test_the_correctly_rounded_overflow_passes(overflowing):
    v = _judge(overflowing, overflowing[2].o[0, 0, 62])
    assert v.passed and v.summary["n_beyond_range"] == 1, v.message


@pytest.mark.parametrize("plant", ["nan", "zero", "sign"])
def test_a_wrong_overflow_row_fails(overflowing, plant):
    row = overflowing[2].o[0, 0, 62].clone()
    big = beyond_range(row[None], torch.float16)
    if plant == "nan":
        row[1] = float("nan")
    elif plant == "zero":
        row.zero_()
    else:
        row = -row
    v = _judge(overflowing, row, f"planted:overflow-{plant}")
    # a zero row is finite: its error against the exact value fails the budget
    assert not v.passed and v.cause == ("implementation" if plant == "zero" else "non-finite"), v.message
    assert bool(big.any())
