"""lla_verify/testing/strategies.py: with full_ridge=True every family's own ridge parameter
(Family.ridge) is drawn over its whole range, ends included, and sets the problem's
lambda with the family's meaning."""

import math

import pytest
import torch
from hypothesis import given, settings

from lla_verify.registry.cases import FAMILIES
from lla_verify.testing.strategies import cases


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_ridge_reaches_both_ends_of_each_familys_ridge(family):
    fam = FAMILIES[family]
    p = fam.param(fam.ridge)
    seen = []

    @settings(max_examples=40, database=None, derandomize=True)
    @given(case=cases((family,), seq=(1, 4), head_dims=(4,), full_ridge=True))
    def prop(case):
        seen.append(case.params[fam.ridge])

    prop()
    assert p.lo in seen and p.hi in seen, f"{family}.{fam.ridge}: drew {sorted(set(seen))[:6]}..."
    assert all(p.lo <= x <= p.hi for x in seen)
    assert len(set(seen)) > 3, f"{family}.{fam.ridge}: only {sorted(set(seen))} drawn"


@pytest.mark.parametrize("family", ["gaussian", "spectrum", "lambda_decades"])
def test_the_drawn_ridge_sets_the_problems_lambda(family):
    fam = FAMILIES[family]

    @settings(max_examples=15, database=None, derandomize=True)
    @given(case=cases((family,), seq=(2, 6), head_dims=(4,), full_ridge=True))
    def prop(case):
        lam = case.build().lam_tensor
        r = case.params[fam.ridge]
        if family == "gaussian":
            want_lo = want_hi = r
        elif family == "spectrum":  # lambda = lam_rel / kappa
            want_lo = want_hi = r / case.params["kappa"]
        else:  # per-query lambdas from lam_lo up to decades above it
            want_lo, want_hi = r, r * 10.0 ** case.params["decades"]
        f32 = 2.0**-23
        assert float(lam.min()) >= want_lo * (1 - f32) and float(lam.max()) <= want_hi * (1 + f32), (
            f"{case.spec()}: lambda in [{float(lam.min()):.3g}, {float(lam.max()):.3g}], "
            f"expected [{want_lo:.3g}, {want_hi:.3g}]")
        if family == "lambda_decades" and case.S > 1 and case.params["decades"] > 0:
            assert float(lam.max()) > float(lam.min())  # still one lambda per query

    prop()


def test_without_full_ridge_the_ridge_shrinks_to_its_easy_value():
    fam = FAMILIES["spectrum"]
    seen = []

    @settings(max_examples=30, database=None, derandomize=True)
    @given(case=cases(("spectrum",), seq=(1, 4), head_dims=(4,)))
    def prop(case):
        seen.append(case.params["lam_rel"])

    prop()
    assert fam.param("lam_rel").easy in seen
    assert not math.isnan(sum(seen)) and torch.tensor(seen).min() >= fam.param("lam_rel").lo
