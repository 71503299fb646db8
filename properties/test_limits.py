"""Limits of SPEC 4 asked of the implementation (docs/math.md §4).

Baselines: lla_verify.oracles.float64.softmax_attention and mesanet_attention (float64).
Each allowance is the implementation's forward budget at that input plus the
limit's own distance, measured on the float64 oracle (so the rate is the oracle's,
and the implementation is asked to follow it).
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lla_verify.testing import suite
from lla_verify.budget.forward import MODEL_SAFETY, float64_trust, forward_budget, kernel_view
from lla_verify.registry.cases import Case, Problem
from lla_verify.oracles.float64 import mesanet_attention, softmax_attention


def _gauss(case: Case, device, lam, scale=None):
    p = Case("gaussian", {"lam": 1.0}, case.B, case.H, case.S, case.D, case.dtype, case.seed).build(device)
    return Problem(case, p.q, p.k, p.v, lam, p.qk_scale if scale is None else scale)


def _assert_rate(what: str, knob: str, dists: list, case) -> None:
    """``dists``: (knob, float64 gap to the limit, float64 error of the oracle there) at
    successive decades. Each pair whose smaller gap stands 10x clear of the oracle's error
    must shrink 5-20x; a draw with no such pair is set aside, so the rate is judged on
    every draw the property counts."""
    pairs = [(k1, g1, k2, g2) for (k1, g1, _), (k2, g2, t2) in zip(dists, dists[1:]) if g2 > 10 * t2]
    if not pairs:
        suite.not_this_property(f"{what}: no gap clear of the oracle's own error")
    for k1, g1, k2, g2 in pairs:
        assert 5.0 <= g1 / g2 <= 20.0, (
            f"{what}: gap ratio {g1 / g2:.3g} between {knob} {k1:g} and {k2:g} (gaps {g1:.3e}, {g2:.3e}) "
            f"on {case.spec()}")


def test_large_lambda_is_softmax_with_rate(impl, device):
    """lambda -> infinity: o -> softmax attention, the distance shrinking like 1/lambda."""
    suite.require(impl, "limits")

    @settings(max_examples=suite.examples(0.3))
    @given(case=suite.case_strategy(impl, device, families=("gaussian",), seq=(2, 40)))
    def prop(case):
        dists = []
        for lam in (1e2, 1e3, 1e4):
            p = _gauss(case, device, lam)
            suite.assume_supported(impl, p)
            o = suite.run(impl, p).double()
            # the limit on the inputs the implementation computes from (and the oracle and
            # budget run on): on the unrounded ones, a bf16-rounding implementation's gap
            # stops shrinking at the rounding's effect, and no rate shows
            view = kernel_view(p, impl)
            sm = softmax_attention(view.q, view.k, view.v, qk_scale=p.qk_scale)
            fb = forward_budget(view, impl, dense=False, rounded=True)
            oracle_gap = (fb.details.o - sm).norm(dim=-1)
            gap = (o - sm).norm(dim=-1)
            # the implementation is within budget of the oracle, whose gap is the limit's
            assert bool((gap <= oracle_gap + fb.allowed).all()), (
                f"softmax limit at lambda={lam:g}: |o - softmax| {float(gap.max()):.3e} exceeds the oracle's "
                f"gap {float(oracle_gap.max()):.3e} + budget {float(fb.allowed.max()):.3e} on {case.spec()}")
            dists.append((lam, float(oracle_gap.max()), float(float64_trust(fb).max())))
        # the rate, ~10x smaller per decade. It is the oracle's (both ends are float64), so
        # it is judged where the gap stands clear of the oracle's own error, not of the
        # implementation's budget, which at bf16 hid every pair
        _assert_rate("softmax limit rate", "lambda", dists, case)

    prop()


def test_small_scale_is_mesanet(impl, device):
    """scale -> 0: o -> the augmented MesaNet form (ridge lambda (i+1) on the key block), O(s)."""
    suite.require(impl, "limits")

    @settings(max_examples=suite.examples(0.3))
    @given(case=suite.case_strategy(impl, device, families=("gaussian",), seq=(2, 40)),
           lam=st.sampled_from([0.1, 1.0, 10.0]))
    def prop(case, lam):
        dists = []
        for scale in (1e-2, 1e-3, 1e-4):
            p = _gauss(case, device, lam, scale=scale)
            suite.assume_supported(impl, p)
            o = suite.run(impl, p).double()
            view = kernel_view(p, impl)  # as for the softmax limit
            mesa = mesanet_attention(view.q, view.k, view.v, ridge_lambda=view.ridge_lambda)
            fb = forward_budget(view, impl, dense=False, rounded=True)
            gap = (fb.details.o - mesa).norm(dim=-1)
            err = (o - mesa).norm(dim=-1)
            assert bool((err <= gap + fb.allowed).all()), (
                f"MesaNet limit at scale {scale:g}: |o - mesa| {float(err.max()):.3e} > oracle gap "
                f"{float(gap.max()):.3e} + budget {float(fb.allowed.max()):.3e} on {case.spec()}")
            dists.append((scale, float(gap.max()), float(float64_trust(fb).max())))
        # the rate, ~10x smaller per decade of s (the oracle's: see the softmax limit)
        _assert_rate("MesaNet limit rate", "scale", dists, case)

    prop()


def test_zero_scale_is_mesanet_exactly(impl, device):
    """scale = 0: every weight is exp(0) = 1 and LLA *is* the MesaNet form (docs/math.md §4.2).

    No limit gap: the implementation at qk_scale = 0 is held to its forward budget
    against the MesaNet formula in float64 (its own formula, not the oracle), plus that
    formula's estimated float64 rounding under the budget's safety factor. An
    implementation that refuses 0, or reads it as "use the default scale", fails.
    """
    suite.require(impl, "limits")

    @settings(max_examples=suite.examples(0.3))
    @given(case=suite.case_strategy(impl, device, families=("gaussian",), seq=(1, 40)),
           lam=st.sampled_from([0.1, 1.0, 10.0]))
    def prop(case, lam):
        p = _gauss(case, device, lam, scale=0.0)
        suite.assume_supported(impl, p)
        o = suite.run(impl, p).double()
        # MesaNet on the inputs the implementation computes from (and the budget is of)
        view = kernel_view(p, impl)
        mesa, mesa_rounding = mesanet_attention(view.q, view.k, view.v, ridge_lambda=view.ridge_lambda,
                                                return_rounding=True)
        fb = forward_budget(view, impl, dense=False, rounded=True)
        allowed = fb.allowed + MODEL_SAFETY * mesa_rounding
        err = (o - mesa).norm(dim=-1)
        assert bool((err <= allowed).all()), (
            f"scale 0: |o - mesa| {float(err.max()):.3e} > budget {float(fb.allowed.max()):.3e} + MesaNet "
            f"rounding {float(MODEL_SAFETY * mesa_rounding.max()):.3e} on {case.spec()} with qk_scale=0")

    prop()


def test_large_scale_is_hard_attention(impl, device):
    """scale -> infinity with a unique argmax key: o_i -> v_{j*}."""
    suite.require(impl, "limits")

    @settings(max_examples=suite.examples(0.3))
    @given(case=suite.case_strategy(impl, device, families=("gaussian",), seq=(2, 40)))
    def prop(case):
        p = _gauss(case, device, 1.0, scale=1.0)
        suite.assume_supported(impl, p)
        a = p.q.double() @ p.k.double().transpose(-1, -2)
        S = a.shape[-1]
        a = a.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=device).tril(), -math.inf)
        top2 = a.topk(min(2, S), dim=-1).values
        gapmin = (top2[..., 0] - top2[..., 1]).clamp(min=0) if S > 1 else torch.ones_like(top2[..., 0])
        gapmin[..., 0] = math.inf  # one key: always unique
        if float(gapmin.min()) < 1e-2:
            suite.not_this_property("a near-tie of the top two scores (the limit is slow there)")
        scale = 60.0 / float(gapmin.min())  # exp(-60) ~ 1e-26: every other weight vanishes in fp32
        p = Problem(case, p.q, p.k, p.v, 1.0, scale)
        o = suite.run(impl, p).double()
        jstar = a.argmax(-1)
        hard = torch.gather(p.v.double(), -2, jstar[..., None].expand(*jstar.shape, p.v.shape[-1]))
        fb = forward_budget(p, impl, dense=False)
        err = (o - hard).norm(dim=-1)
        gap = (fb.details.o - hard).norm(dim=-1)
        assert bool((err <= gap + fb.allowed).all()), (
            f"hard-attention limit at scale {scale:.3g}: |o - v_j*| {float(err.max()):.3e} > "
            f"{float((gap + fb.allowed).max()):.3e} on {case.spec()}")

    prop()
