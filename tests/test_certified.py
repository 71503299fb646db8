"""The certified oracle (interval enclosures) and the mp oracle's self-check.

An enclosure [lo, hi] from ``lla_forward_interval`` contains the exact o; these
tests check that it does contain what exact arithmetic says it must (v_0, a constant
value), that the mp and float64 oracles fall inside it (the float64 one after
widening by its own derived error budget), that it is tight and honest (its width
scales as 2^-prec, and is never 0), and that it refuses to bound rows with no value.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from lla_verify.oracles.float64 import lla_forward_details
from lla_verify.oracles.mp import lla_forward_details_mp, lla_forward_interval, lla_forward_mp, mp_self_check
from lla_contract import LLAInputError

pytestmark = pytest.mark.mp

F64 = torch.float64
U64 = 2.0**-53


@pytest.fixture(autouse=True)
def _precision_not_leaked():
    mpmath.mp.dps, mpmath.iv.prec = 15, 53
    yield
    leaked = (mpmath.mp.dps, mpmath.iv.prec)
    mpmath.mp.dps, mpmath.iv.prec = 15, 53
    assert leaked == (15, 53), f"precision leaked: mp.dps, iv.prec = {leaked}"


def qkv(seed, S, D, lead=(), Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, S, D, generator=g, dtype=F64)
    k = torch.randn(*lead, S, D, generator=g, dtype=F64)
    v = torch.randn(*lead, S, Dv or D, generator=g, dtype=F64)
    return q, k, v


def iv_endpoints(x):
    return tuple(mpmath.mp.make_mpf(r) for r in x._mpi_)


def assert_within(label, err, budget, **context):
    __tracebackhide__ = True
    err, budget = torch.as_tensor(err, dtype=F64), torch.as_tensor(budget, dtype=F64).expand_as(err)
    bad = ~(err <= budget)
    if bool(bad.any()):
        ratio = torch.nan_to_num(err / budget, nan=math.inf)
        worst = int(ratio.reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        ctx = ", ".join(f"{k}={v}" for k, v in context.items())
        pytest.fail(f"{label}: {int(bad.sum())} / {err.numel()} exceed the budget; worst at {idx}: error "
                    f"{err[idx].item():.3e}, budget {budget[idx].item():.3e}, ratio {ratio[idx].item():.3g}"
                    + (f" ({ctx})" if ctx else ""))


WELL = [
    pytest.param(0, 6, 3, (), 1.0, None, id="S6-D3-lam1"),
    pytest.param(1, 8, 8, (), 3.0, 0.5, id="S8-D8-lam3-scale0.5"),
    pytest.param(2, 7, 2, (2,), "per-query", 2.0, id="S7-D2-B2-per-query-sharp"),
    pytest.param(3, 8, 4, (), 0.0, None, id="S8-D4-lam0"),
]


def _lam(lam, lead, S):
    return torch.logspace(-2, 1, S, dtype=F64).expand(*lead, S) if lam == "per-query" else lam


@pytest.mark.parametrize("seed,S,D,lead,lam,scale", WELL)
def test_mp_and_f64_inside_enclosure(seed, S, D, lead, lam, scale):
    """mp at 80 digits (error ~1e-75) lies inside the prec-200 enclosure (width ~1e-55),
    compared in mp; mp at 50 digits rounded to float64 lies inside the float64
    enclosure; the float64 oracle lies within its derived budget
    8 (D+1) u kappa omega/delta max|v| of the enclosure. Undefined rows (lambda = 0,
    i < D) are unbounded, and exactly those."""
    q, k, v = qkv(seed, S, D, lead)
    lam = _lam(lam, lead, S)
    r = lla_forward_interval(q, k, v, ridge_lambda=lam, qk_scale=scale, return_iv=True)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    assert torch.equal(r.unbounded, d.undefined)
    ok = ~r.unbounded
    _, o80 = lla_forward_mp(q, k, v, ridge_lambda=lam, qk_scale=scale, dps=80, return_mp=True)
    with mpmath.workdps(80):
        outside = [idx for idx in zip(*[x.reshape(-1).tolist() for x in torch.nonzero(ok, as_tuple=True)])
                   for e in range(v.shape[-1])
                   if not (iv_endpoints(r.iv[idx][e])[0] <= o80[idx][e] <= iv_endpoints(r.iv[idx][e])[1])]
    assert not outside, f"mp(80) outside the enclosure at rows {outside[:5]}"
    o50 = lla_forward_mp(q, k, v, ridge_lambda=lam, qk_scale=scale, dps=50)
    assert bool(r.contains(o50)[ok].all())
    dist = torch.maximum(r.lo - d.o, d.o - r.hi).clamp_min(0).amax(-1)
    budget = 8 * (D + 1) * U64 * d.kappa * d.omega / d.delta * v.abs().amax()
    assert_within("f64 distance to enclosure", dist[ok], budget[ok])


@pytest.mark.parametrize("seed,S,D,lead,lam,scale", WELL[:3])
def test_enclosures_are_tight(seed, S, D, lead, lam, scale):
    """Width / |midpoint| < 1e-30 at prec 200 on well-conditioned rows (2^-200 ~ 6e-61,
    times kappa, omega/delta and the overestimation of interval elimination)."""
    q, k, v = qkv(seed, S, D, lead)
    r = lla_forward_interval(q, k, v, ridge_lambda=_lam(lam, lead, S), qk_scale=scale, return_iv=True)
    assert not r.unbounded.any()
    worst = 0.0
    with mpmath.workdps(70):
        for x in r.iv.reshape(-1):
            a, b = iv_endpoints(x)
            assert b > a  # exp(x) is irrational: an honest enclosure has positive width
            worst = max(worst, float((b - a) / max(abs(a), abs(b))))
    assert worst < 1e-30, f"relative width {worst:.3e}"


def test_width_scales_with_precision():
    """Doubling nothing but prec from 120 to 200 bits shrinks every width by 2^80 (to a
    factor 2^8 either way): the enclosures come from the arithmetic, not from a point
    value given a fixed margin."""
    q, k, v = qkv(10, 6, 3)
    widths = {}
    for prec in (120, 200):
        r = lla_forward_interval(q, k, v, ridge_lambda=1.0, prec=prec, return_iv=True)
        with mpmath.workdps(70):
            widths[prec] = [iv_endpoints(x)[1] - iv_endpoints(x)[0] for x in r.iv.reshape(-1)]
    with mpmath.workdps(70):
        log2 = torch.tensor([float(mpmath.log(a / b, 2)) for a, b in zip(widths[120], widths[200])], dtype=F64)
    assert_within("log2 width ratio - 80", (log2 - 80).abs(), torch.tensor(8.0))


@pytest.mark.parametrize("lam", [pytest.param(1.0, id="lam1"), pytest.param(1e-30, id="lam1e-30"),
                                 pytest.param(1e6, id="lam1e6")])
def test_enclosure_contains_exact_values(lam):
    """Two values exact arithmetic fixes without any oracle: o_0 = v_0 (lambda > 0) and,
    for constant values v_j = c, o_i = c at every row."""
    S, D = 6, 3
    q, k, v = qkv(20, S, D)
    r = lla_forward_interval(q, k, v, ridge_lambda=lam)
    assert bool(r.contains(v[0])[0].all()), (r.lo[0], v[0], r.hi[0])
    c = torch.tensor([0.1, -2.5], dtype=F64).expand(S, 2)
    rc = lla_forward_interval(q, k, c, ridge_lambda=lam)
    assert bool(rc.contains(c).all())


def test_ill_conditioned_certifies_mp_against_f64():
    """kappa(Sigma_i) > 1e16 (lambda 1e-20, early tokens): the enclosure stays bounded and
    narrow, contains the mp value and excludes the float64 oracle's answer on some row:
    a certificate that the float64 oracle, not the mp one, is wrong there."""
    S, D = 8, 4
    q, k, v = qkv(30, S, D)
    r = lla_forward_interval(q, k, v, ridge_lambda=1e-20)
    d = lla_forward_details(q, k, v, ridge_lambda=1e-20)
    ill = d.kappa > 1e16
    assert bool(ill.any()) and not r.unbounded.any()
    o_mp = lla_forward_mp(q, k, v, ridge_lambda=1e-20, dps=60)
    assert bool(r.contains(o_mp).all())
    assert not bool(r.contains(d.o)[ill].all())
    rel = ((r.hi - r.lo) / o_mp.abs()).amax(-1)
    assert_within("ill-conditioned enclosure width", rel, torch.tensor(1e-15))


def test_delta_enclosure_contains_mp_delta():
    q, k, v = qkv(40, 7, 3)
    lam = torch.logspace(-3, 1, 7, dtype=F64)
    r = lla_forward_interval(q, k, v, ridge_lambda=lam)
    dm = lla_forward_details_mp(q, k, v, ridge_lambda=lam, dps=50)
    assert bool(((r.delta_lo <= dm.delta) & (dm.delta <= r.delta_hi)).all())


def test_unbounded_rows_say_why():
    q, k, v = qkv(50, 7, 3)
    r = lla_forward_interval(q, k, v, ridge_lambda=0.0)
    assert torch.equal(r.unbounded, torch.arange(7) < 3)
    assert torch.isinf(r.lo[:3]).all() and torch.isinf(r.hi[:3]).all()
    assert len(r.notes) == 3 and all("unbounded" in n for n in r.notes)
    assert "contains 0" in r.notes[2] or "singular" in r.notes[2]


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda q, k, v: lla_forward_interval(q, k, v, ridge_lambda=1.0, prec=40), "^prec: expected an int >= 60",
                 id="prec-low"),
    pytest.param(lambda q, k, v: lla_forward_interval(q, k[:2], v, ridge_lambda=1.0), "^k: expected the shape of q",
                 id="shape"),
    pytest.param(lambda q, k, v: lla_forward_interval(*qkv(1, 64, 8), ridge_lambda=1.0),
                 "^lla_forward_interval: problem too large", id="too-large"),
    pytest.param(lambda q, k, v: mp_self_check(q, k, v, ridge_lambda=1.0, dps_pair=(60, 30)), "^dps_pair: expected dps_lo < dps_hi",
                 id="self-check-order"),
])
def test_certified_argument_errors(call, match):
    q, k, v = qkv(60, 4, 2)
    with pytest.raises(LLAInputError, match=match):
        call(q, k, v)


# --------------------------------------------------------------------------- self-check

SELF = [
    pytest.param(70, 24, 4, 1.0, None, id="S24-D4-lam1"),
    pytest.param(71, 32, 8, 0.01, 2.0, id="S32-D8-lam0.01-sharp"),
    pytest.param(72, 16, 4, 0.0, None, id="S16-D4-lam0"),
    pytest.param(73, 12, 4, 1e-20, None, id="S12-D4-lam1e-20-ill"),
]


@pytest.mark.parametrize("seed,S,D,lam,scale", SELF)
def test_self_check_meets_its_claim(seed, S, D, lam, scale):
    """At (30, 60) digits every defined output agrees on at least the digits claimed for
    its row, and on well-conditioned rows (kappa omega/delta < 1e4) the claim is past
    17 digits: the mp oracle's float64 output is correctly rounded or within an ulp."""
    q, k, v = qkv(seed, S, D)
    sc = mp_self_check(q, k, v, ridge_lambda=lam, qk_scale=scale)
    defined = ~torch.isnan(sc.claimed)
    assert bool(defined.any())
    short = (sc.claimed[:, None] - sc.digits).clamp_min(0)
    assert_within("digits short of the claim", short[defined], torch.tensor(0.0))
    assert bool(sc.ok().all())
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    easy = defined & (d.kappa * d.omega / d.delta < 1e4)
    if lam >= 0.01:
        assert bool(easy.any())
    assert bool((sc.claimed[easy] > 17).all()), sc.claimed[easy].tolist()
