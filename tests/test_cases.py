"""The families of lla_verify/registry/cases.py reach what they claim to target (SPEC 7)."""

import pytest
import torch

from lla_verify.registry.cases import FAMILIES, Case, parse_case
from lla_verify.oracles.float64 import lla_forward_details
from lla_contract import LLAInputError


def details(case):
    p = case.build()
    return p, lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_spec_round_trips_and_build_is_deterministic(family):
    c = Case(family, {}, B=2, H=1, S=19, D=8, dtype="bfloat16", seed=5)
    assert parse_case(c.spec()) == c
    a, b = c.build(), c.build()
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert a.q.dtype == torch.bfloat16


def test_near_singular_family_reaches_kappa_1e6_for_most_queries():
    _, d = details(Case("subspace", {"rank": 2, "noise": 1e-5, "lam": 1e-10}, S=48, D=8, seed=3))
    frac = float((d.kappa >= 1e6).double().mean())
    assert frac >= 0.9, f"only {frac:.0%} of queries have kappa >= 1e6"


def test_clusters_and_duplicates_are_ill_conditioned():
    _, d = details(Case("clusters", {"clusters": 2, "spread": 1e-4, "lam": 1e-8}, S=40, D=8, seed=1))
    assert float(d.kappa.median()) >= 1e4
    _, d = details(Case("duplicates", {"pool": 2, "lam": 1e-6}, S=40, D=8, seed=1))
    assert float(d.kappa[..., 8:].median()) >= 1e4


def test_extreme_bandwidth_puts_99pct_weight_on_one_key():
    p, d = details(Case("bandwidth", {"scale": 100.0}, S=40, D=8, seed=2))
    a = p.qk_scale * (p.q.double() @ p.k.double().transpose(-1, -2))
    a = a.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf"))
    w = torch.softmax(a, -1)
    frac = float((w.max(-1).values >= 0.99).double().mean())
    assert frac >= 0.9, f"only {frac:.0%} of queries put >= 99% of the weight on one key"
    p, d = details(Case("bandwidth", {"scale": 1e-4}, S=40, D=8, seed=2))
    assert float((d.omega / torch.arange(1, 41) - 1).abs().max()) < 1e-2  # uniform weights


def test_early_tokens_have_kappa_about_one_over_lambda():
    _, d = details(Case("early", {"lam": 1e-8}, S=12, D=8, seed=0))
    assert float(d.kappa[..., 1:7].min()) >= 1e6


def test_offset_family_has_norm_much_larger_than_differences():
    p, _ = details(Case("offset", {"offset": 1e3}, S=16, D=8, seed=0))
    assert float(p.q.double().norm(dim=-1).min()) > 50 * float((p.k.double() - p.q.double()).norm(dim=-1).max())


def test_lambda_decades_spans_decades():
    p, _ = details(Case("lambda_decades", {"lam_lo": 1e-4, "decades": 5.0}, S=64, D=8, seed=0))
    lam = p.lam_tensor
    assert float(lam.max() / lam.min()) > 1e3


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6])
def test_spectrum_family_tracks_prescribed_kappa(kappa):
    _, d = details(Case("spectrum", {"kappa": kappa, "rotate": 1}, S=64, D=8, seed=1))
    med = float(d.kappa[..., 16:].median())
    assert kappa / 30 <= med <= kappa * 30, f"median kappa {med:.3g} for prescribed {kappa:g}"


def test_linear_values_are_linear_in_keys():
    p, _ = details(Case("linear_values", {}, S=20, D=4, seed=0))
    # v = A k + b: the augmented key matrix [k, 1] explains v exactly
    X = torch.cat([p.k.double(), torch.ones(*p.k.shape[:-1], 1, dtype=torch.float64)], -1)[0, 0]
    sol = torch.linalg.lstsq(X, p.v.double()[0, 0]).solution
    assert float((X @ sol - p.v.double()[0, 0]).abs().max()) < 1e-5


@pytest.mark.parametrize("bad, match", [
    ("nofamily::B=1", "family"),
    ("gaussian:lam=1", "expected"),
    ("gaussian::B=1,Q=3", "unknown shape field"),
])
def test_bad_specs_are_rejected_with_the_reason(bad, match):
    with pytest.raises(LLAInputError, match=match):
        parse_case(bad)


def test_unknown_parameter_is_named():
    with pytest.raises(LLAInputError, match="no parameter 'zz'"):
        Case("gaussian", {"zz": 1.0}).build()
