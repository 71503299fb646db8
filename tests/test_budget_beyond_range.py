"""Rows whose exact output lies beyond the output dtype's range (lla_verify/budget/verdict.py):
the correctly rounded output is infinite there, so such a row passes when it overflows with
the exact value's sign and fails on NaN, on a finite value, or on the wrong sign."""

from __future__ import annotations

import pytest
import torch

from lla_verify.budget.parallax import check_parallax_decode, parallax_budget
from lla_verify.budget.verdict import beyond_range, overflow_ok
from lla_verify.registry.cases import parse_case


def test_beyond_range_is_what_rounds_to_inf():
    x = torch.tensor([[7.0e4, 1.0], [6.0e4, 1.0], [65519.0, 0.0], [65520.0, 0.0], [-1e6, 0.0]], dtype=torch.float64)
    assert beyond_range(x, torch.float16).tolist() == [True, False, False, True, True]
    assert not beyond_range(x, torch.float64).any()
    assert not beyond_range(x, torch.bfloat16).any()


def test_overflow_ok_wants_the_exact_sign_and_no_nan():
    exact = torch.tensor([[7.0e4, 1.0]], dtype=torch.float64)
    inf = torch.tensor([[float("inf"), 0.5]], dtype=torch.float64)
    assert overflow_ok(inf, exact, torch.float16).tolist() == [True]
    assert overflow_ok(torch.tensor([[65504.0, 1.0]], dtype=torch.float64), exact, torch.float16).tolist() == [True]
    for bad in ([[float("-inf"), 1.0]], [[1.0, 1.0]], [[float("inf"), float("nan")]]):
        assert overflow_ok(torch.tensor(bad, dtype=torch.float64), exact, torch.float16).tolist() == [False], bad


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
    assert not v.passed and v.cause == "non-finite", v.message
    assert bool(big.any())
