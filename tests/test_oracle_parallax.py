"""The Parallax float64 oracle against the exact identities it must satisfy (docs/math.md)."""

import pytest
import torch

from lla_contract import LLAInputError
from lla_verify.oracles.float64 import lla_forward, softmax_attention
from lla_verify.oracles.parallax import lla_probe, parallax_forward

U64 = 2.0**-53


def _qkvr(S=40, D=8, Dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, S, Dv, generator=g, dtype=torch.float64)
    r = torch.randn(2, 2, S, D, generator=g, dtype=torch.float64)
    return q, k, v, r


@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_lla_probe_reduces_parallax_to_lla(lam):
    q, k, v, _ = _qkvr()
    r = lla_probe(q, k, v, ridge_lambda=lam)
    got, want = parallax_forward(q, k, v, r), lla_forward(q, k, v, ridge_lambda=lam)
    # both are float64 evaluations of the same value; the solve's conditioning bounds the gap
    torch.testing.assert_close(got, want, rtol=0, atol=1e4 * U64 / lam)


def test_zero_probe_is_softmax_attention():
    q, k, v, r = _qkvr(Dv=5)
    torch.testing.assert_close(parallax_forward(q, k, v, torch.zeros_like(r)), softmax_attention(q, k, v),
                               rtol=0, atol=16 * U64)


def test_key_offset_cancels_in_the_chunked_centred_form():
    q, k, v, r = _qkvr()
    c = 1e3 * torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(parallax_forward(q, k + c, v, r, chunk_bytes=10_000), parallax_forward(q, k, v, r),
                               rtol=0, atol=1e4 * U64 * 1e3)


@pytest.mark.parametrize("bad, match", [
    (lambda q: q[..., :-1], "r: expected the shape of q"),
    (lambda q: q.to(torch.int32), "r: expected a floating dtype"),
    (lambda q: q.clone().fill_(float("nan")), "r: expected finite values"),
    (lambda q: q.tolist(), "r: expected a torch.Tensor"),
])
def test_bad_probe_is_named(bad, match):
    q, k, v, _ = _qkvr(S=4)
    with pytest.raises(LLAInputError, match=match):
        parallax_forward(q, k, v, bad(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budget_passes_the_dense_reference_and_fails_a_dropped_term(dtype):
    from lla_verify.budget.parallax import check_parallax_forward
    from lla_verify.oracles.parallax import parallax_dense

    q, k, v, r = (t.to(dtype) for t in _qkvr(S=24, D=16, Dv=16))
    honest = parallax_dense(q, k, v, r)
    ok = check_parallax_forward(q, k, v, r, honest, impl="dense", case="gaussian")
    assert ok.passed, ok.message
    # a kernel that forgets the covariance term is softmax attention: far outside the budget
    wrong = parallax_dense(q, k, v, torch.zeros_like(r))
    bad = check_parallax_forward(q, k, v, r, wrong, impl="dropped-term", case="gaussian")
    assert not bad.passed and bad.cause == "implementation" and bad.ratio > 10, bad.message
    # and one output ulp-level nudge in one row is still inside it
    nudged = honest.clone()
    nudged[0, 0, 5] = nudged[0, 0, 5] * (1 + torch.finfo(dtype).eps)
    assert check_parallax_forward(q, k, v, r, nudged, impl="nudged", case="gaussian").passed


def test_a_score_shift_acts_on_its_query_through_the_softmax_only():
    """``score_shift`` is added to the scores before the softmax: a shift constant over a
    query's keys changes nothing (the softmax sees differences only), one entry changes
    that query's row alone, entries above the diagonal are ignored; chunked or not."""
    q, k, v, r = _qkvr(S=12)
    base = parallax_forward(q, k, v, r)
    g = torch.Generator().manual_seed(3)
    per_query = torch.randn(2, 2, 12, 1, generator=g, dtype=torch.float64).expand(2, 2, 12, 12)
    for chunk in (None, 2_000):
        kw = {} if chunk is None else {"chunk_bytes": chunk}
        torch.testing.assert_close(parallax_forward(q, k, v, r, score_shift=per_query, **kw), base,
                                   rtol=0, atol=64 * U64)
        future = torch.zeros(2, 2, 12, 12, dtype=torch.float64).triu(1) + torch.ones(12, 12).triu(1).double()
        # (to rounding: the shifted scores are a new tensor, which the softmax may sum in another order)
        torch.testing.assert_close(parallax_forward(q, k, v, r, score_shift=future, **kw), base,
                                   rtol=0, atol=64 * U64)
        one = torch.zeros(2, 2, 12, 12, dtype=torch.float64)
        one[1, 0, 7, 3] = 0.5
        moved = (parallax_forward(q, k, v, r, score_shift=one, **kw) - base).norm(dim=-1)
        assert float(moved[1, 0, 7]) > 1e-3
        moved[1, 0, 7] = 0
        assert float(moved.max()) <= 64 * U64


def test_a_score_shift_of_another_shape_is_refused():
    q, k, v, r = _qkvr(S=12)
    with pytest.raises(ValueError, match=r"^score_shift: expected shape \(2, 2, 12, 12\)"):
        parallax_forward(q, k, v, r, score_shift=torch.zeros(2, 2, 12, 11, dtype=torch.float64))
