"""lla_verify/testing/suite.py: the property suite draws only what an implementation's record
accepts, rejects (never skips on) an unsupported draw inside @given, and skips a whole
property, with the record's reason, only outside @given."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from lla_verify.testing import suite
from lla_verify.registry.cases import Case
from lla_verify.registry.impls import Impl
from lla_verify.oracles.dense import dense_torch_lla

NARROW = Impl(name="narrow", forward=dense_torch_lla, description="bf16, D = 16, one lambda",
              dtypes=(torch.bfloat16,), head_dims=(16,), per_query_lambda=False)


def test_case_strategy_draws_only_what_the_record_accepts():
    drawn = []

    @settings(max_examples=60, database=None, derandomize=True)
    @given(case=suite.case_strategy(NARROW, "cpu", dtypes=("float32", "bfloat16", "float16")))
    def prop(case):
        drawn.append(case)

    prop()
    assert {c.dtype for c in drawn} == {"bfloat16"}
    assert {c.D for c in drawn} == {16}
    assert "lambda_decades" not in {c.family for c in drawn} and len({c.family for c in drawn}) > 3


def test_a_property_the_record_cannot_serve_is_skipped_with_its_reason():
    with pytest.raises(pytest.skip.Exception, match="narrow accepts none of the dtypes"):
        suite.case_strategy(NARROW, "cpu", dtypes=("float32",))
    with pytest.raises(pytest.skip.Exception, match="one lambda per call"):
        suite.case_strategy(NARROW, "cpu", families=("lambda_decades",))
    fwd_only = Impl(name="fwd", forward=dense_torch_lla, description="", skips={"grad": "no backward here"})
    with pytest.raises(pytest.skip.Exception, match="no backward here"):
        suite.require(fwd_only, "grad")
    suite.require(fwd_only, "forward")  # no reason recorded: nothing happens


def test_an_unsupported_draw_does_not_end_the_property():
    seen = []

    @settings(max_examples=30, database=None, derandomize=True)
    @given(dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 5))
    def prop(dtype, seed):
        p = Case("gaussian", {}, S=4, D=16, dtype=dtype, seed=seed).build()
        suite.assume_supported(NARROW, p)
        seen.append(dtype)

    try:
        prop()
    except pytest.skip.Exception as exc:
        pytest.fail(f"an unsupported draw ended the whole property as a skip: {exc}")
    assert "bfloat16" in seen and "float32" not in seen


def test_a_property_whose_every_draw_is_rejected_fails():
    @settings(max_examples=10, database=None, derandomize=True)
    @given(seed=st.integers(0, 5))
    def prop(seed):
        suite.assume_supported(NARROW, Case("gaussian", {}, S=4, D=16, dtype="float32", seed=seed).build())

    try:
        with pytest.raises(Unsatisfiable):
            prop()
    except pytest.skip.Exception as exc:
        pytest.fail(f"a property with no supported draw ended as a skip: {exc}")


def test_per_query_lambda_is_unsupported_for_a_one_lambda_record():
    p = Case("lambda_decades", {"decades": 3.0}, S=6, D=16, dtype="bfloat16").build()
    assert "one lambda per call" in suite.unsupported(NARROW, p)
    assert suite.unsupported(NARROW, Case("gaussian", {}, S=6, D=16, dtype="bfloat16").build()) is None


def test_skip_unless_refuses_to_run_inside_given():
    @settings(max_examples=1, database=None)
    @given(seed=st.just(0))
    def prop(seed):
        suite.skip_unless(NARROW, "forward", Case("gaussian", {}, S=4, D=16, dtype="float32").build())

    # a skip is a BaseException that pytest.raises lets through: without this, a
    # skip_unless that skipped inside @given would leave this test skipped, not failed
    try:
        with pytest.raises(RuntimeError, match="inside @given"):
            prop()
    except pytest.skip.Exception as exc:
        pytest.fail(f"skip_unless inside @given skipped the property instead of refusing: {exc}")


def test_a_property_that_sets_aside_every_draw_fails_instead_of_passing_empty():
    """suite.not_this_property in place of a bare return: a property that can judge none
    of its draws is Unsatisfiable, where a bare return would pass it having asserted
    nothing."""
    @settings(max_examples=5, database=None, derandomize=True)
    @given(st.integers(0, 10))
    def prop(x):
        suite.not_this_property("never judged")

    with pytest.raises(Unsatisfiable):
        prop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qk_scale", [1.0, 0.25, 128 ** -0.5, 1e-3])
def test_score_shift_is_exact_and_moves_each_row_by_a_constant(dtype, qk_scale):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 9, 16, generator=gen).mul(3).to(dtype) for _ in range(2))
    q1, k1, q2, k2 = suite.score_shift(q, k, qk_scale)
    d = lambda a, b: b.double() - a.double()  # noqa: E731
    assert torch.equal(d(q1, k1)[..., :-1], d(q, k)[..., :-1]), "only the last coordinate changes"
    # k_j - q_i unchanged exactly, so LLA's regression is the same problem
    z1 = k1.double()[..., None, :, :] - q1.double()[..., :, None, :]
    z2 = k2.double()[..., None, :, :] - q2.double()[..., :, None, :]
    assert torch.equal(z1, z2)
    # the scores move by a per-row constant of at least half the asked shift
    a1 = q1.double() @ k1.double().transpose(-1, -2)
    a2 = q2.double() @ k2.double().transpose(-1, -2)
    row = (a2 - a1) * qk_scale
    assert torch.allclose(row, row[..., :1].expand_as(row), rtol=0, atol=1e-9 * float(row.abs().max()))
    assert float(row.min()) >= 100.0
