"""The mpmath oracle (lla_verify/oracles/mp.py) against the float64 oracle, and why it is
needed: where kappa(Sigma_i) passes 1/u64 the float64 oracle has no digit left and
the mp oracle, checked against itself at a higher precision, still has dozens.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from lla_verify.oracles.float64 import lla_forward, lla_forward_details
from lla_verify.oracles.mp import (
    lla_forward_details_mp,
    lla_forward_mp,
    lla_grad_mp,
    lla_jvp_mp,
)
from lla_contract import LLAInputError

pytestmark = pytest.mark.mp

F64 = torch.float64
U64 = 2.0**-53


@pytest.fixture(autouse=True)
def _precision_not_leaked():
    """Every test starts and ends at mpmath's defaults: no test may leak precision."""
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


def row_rel(a, b):
    """max_e |a - b| / max_e |b| per row (..., S)."""
    return (a - b).abs().amax(-1) / b.abs().amax(-1)


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


# --------------------------------------------------------------------------- f64 vs mp

WELL = [
    pytest.param(0, (), 1.0, None, id="lam1"),
    pytest.param(1, (2,), 3.3, None, id="lam3.3-B2"),
    pytest.param(2, (), 10.0, 2.0, id="lam10-scale2"),
    pytest.param(3, (1, 2), "per-query", 0.5, id="lam-per-query-1..10-BH"),
]


def _lam(lam, lead, S):
    if lam == "per-query":
        return torch.linspace(1.0, 10.0, S, dtype=F64).expand(*lead, S)
    return lam


@pytest.mark.parametrize("seed,lead,lam,scale", WELL)
def test_f64_matches_mp_on_well_conditioned(seed, lead, lam, scale):
    """lambda in 1..10, Gaussian, S 12, D 4: the float64 oracle is right to 1e-12
    relative, and its own derived budget 8 (D+1) u kappa omega/delta says so too."""
    S, D = 12, 4
    q, k, v = qkv(seed, S, D, lead)
    lam = _lam(lam, lead, S)
    o_mp = lla_forward_mp(q, k, v, ridge_lambda=lam, qk_scale=scale)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    err = row_rel(d.o, o_mp)
    assert_within("f64 vs mp (1e-12)", err, torch.full_like(err, 1e-12))
    budget = 8 * (D + 1) * U64 * d.kappa * d.omega / d.delta * v.abs().amax() / o_mp.abs().amax(-1)
    assert_within("f64 vs mp (derived)", err, budget)


@pytest.mark.parametrize("seed,lead,lam,scale", WELL)
def test_details_match_f64(seed, lead, lam, scale):
    """omega, mu, rho, delta and kappa of the two oracles agree on well-conditioned input
    (kappa from eigvalsh in float64: ~ kappa u relative)."""
    S, D = 12, 4
    q, k, v = qkv(seed, S, D, lead)
    lam = _lam(lam, lead, S)
    dm = lla_forward_details_mp(q, k, v, ridge_lambda=lam, qk_scale=scale)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    tol = 64 * D * U64 * d.kappa.max()
    for name in ("m", "omega", "mu", "rho", "delta", "kappa"):
        a, b = getattr(d, name), getattr(dm, name)
        rel = (a - b).abs().max() / b.abs().max()
        assert_within(f"details.{name}", rel, tol)
    assert not dm.undefined.any()


ILL = [
    # Keys' and queries' last coordinate within 1e-8 of 0.3: Sigma_i is nearly singular
    # along e_D, lambda 1e-20 barely regularises it.
    pytest.param(10, 1e-8, 1e-20, id="near-subspace-1e-8-lam1e-20"),
    pytest.param(11, 1e-10, 1e-20, id="near-subspace-1e-10-lam1e-20"),
    # Early tokens: Sigma_i of rank i + 1 < D plus a 1e-20 ridge.
    pytest.param(12, None, 1e-20, id="early-tokens-lam1e-20"),
]


@pytest.mark.parametrize("seed,thick,lam", ILL)
def test_f64_fails_where_kappa_exceeds_1e16_and_mp_does_not(seed, thick, lam):
    """Where lla_forward_details reports kappa > 1e16 the float64 oracle is off by far
    more than its well-conditioned 1e-12 (> 1e-6 on some such row), while the mp
    oracle agrees with itself at 50 and 80 digits to > 20 digits on those rows."""
    S, D = 12, 4
    q, k, v = qkv(seed, S, D)
    if thick is not None:
        g = torch.Generator().manual_seed(seed + 1)
        k[:, -1] = 0.3 + thick * torch.randn(S, generator=g, dtype=F64)
        q[:, -1] = 0.3 + thick * torch.randn(S, generator=g, dtype=F64)
    d = lla_forward_details(q, k, v, ridge_lambda=lam)
    dm = lla_forward_details_mp(q, k, v, ridge_lambda=lam, dps=50)
    ill = d.kappa > 1e16
    assert bool(ill.any()), f"kappa max {d.kappa.max().item():.3e}"
    # the two oracles agree that these rows are that ill-conditioned
    assert bool((dm.kappa[ill] > 1e15).all()), dm.kappa[ill].tolist()
    o80 = lla_forward_mp(q, k, v, ridge_lambda=lam, dps=80)
    err_f64 = torch.nan_to_num(row_rel(d.o, o80), nan=math.inf)
    err_mp = row_rel(dm.o, o80)
    assert err_f64[ill].max() > 1e-6, f"f64 error on ill rows {err_f64[ill].tolist()}"
    assert_within("mp at 50 vs 80 digits on ill rows", err_mp[ill], torch.tensor(1e-20))


def test_mp_first_token_where_f64_gives_nan():
    """o_0 = v_0 for every lambda > 0; at lambda 1e-30 the float64 oracle's f = 1 - <z, rho>
    rounds to 0 (0/0), the mp oracle still has ~20 digits of f and returns v_0."""
    q, k, v = qkv(20, 6, 4, (2,))
    o = lla_forward_mp(q, k, v, ridge_lambda=1e-30)
    assert_within("mp o_0 = v_0", (o[..., 0, :] - v[..., 0, :]).abs(), U64 * v[..., 0, :].abs())
    # whether f rounds to exactly 0 depends on the input: here in one of the two sequences
    assert torch.isnan(lla_forward(q, k, v, ridge_lambda=1e-30)[..., 0, :]).any()


@pytest.mark.parametrize("case", [
    pytest.param("gauss", id="gauss-keys"),
    pytest.param("affine-subspace", id="keys-queries-in-hyperplane"),
    pytest.param("per-query-zeros", id="lam0-at-even-positions"),
])
def test_undefined_rows_agree_with_f64(case):
    """lambda = 0 rows with singular G_i: NaN in both oracles, decided independently."""
    S, D = 10, 3
    q, k, v = qkv(30, S, D)
    lam = torch.zeros(S, dtype=F64)
    if case == "affine-subspace":
        k[:, -1] = 0.7  # every x_ij = [1, z_ij] has z_ijD = 0.7 - q_iD: G_i singular for all i
    if case == "per-query-zeros":
        lam[1::2] = 0.5
    d = lla_forward_details(q, k, v, ridge_lambda=lam)
    dm = lla_forward_details_mp(q, k, v, ridge_lambda=lam)
    assert torch.equal(d.undefined, dm.undefined)
    assert torch.equal(torch.isnan(dm.o).all(-1), dm.undefined)
    assert not torch.isnan(dm.o[~dm.undefined]).any()
    if case == "affine-subspace":
        assert dm.undefined.all()
    else:
        assert torch.equal(dm.undefined, (lam == 0) & (torch.arange(S) < D))
    ok = ~d.undefined
    if bool(ok.any()):
        budget = 8 * (D + 1) * U64 * d.kappa * d.omega / d.delta * v.abs().amax() / dm.o.abs().amax(-1)
        assert_within("f64 vs mp at lambda 0", row_rel(d.o, dm.o)[ok], budget[ok])


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="f16")])
def test_low_precision_inputs_taken_exactly(dtype):
    q, k, v = (t.to(dtype) for t in qkv(40, 7, 3))
    a = lla_forward_mp(q, k, v, ridge_lambda=0.5)
    b = lla_forward_mp(q.double(), k.double(), v.double(), ridge_lambda=0.5)
    assert torch.equal(a, b)


def test_return_mp_and_shapes():
    q, k, v = qkv(41, 5, 3, (2, 1), Dv=2)
    o, o_mp = lla_forward_mp(q, k, v, ridge_lambda=torch.tensor([0.5, 2.0], dtype=F64)[:, None, None],
                             return_mp=True, dps=40)
    assert o.shape == (2, 1, 5, 2) and o_mp.shape == (2, 1, 5, 2)
    assert isinstance(o_mp[1, 0, 4, 1], mpmath.mpf)
    assert float(o_mp[1, 0, 4, 1]) == o[1, 0, 4, 1].item()
    d = lla_forward_details_mp(q, k, v, ridge_lambda=1.0, return_mp=True)
    assert d.mp["rho"].shape == (2, 1, 5, 3) and d.kappa.shape == (2, 1, 5)


# --------------------------------------------------------------------------- gradients

GRAD = [
    pytest.param(50, (), "per-query", None, id="S6-D3-lam-per-query"),
    pytest.param(51, (), 2.0, 1.5, id="S6-D3-lam2-scalar-scale1.5"),
    pytest.param(52, (2,), "per-query", 0.3, id="S6-D3-B2-per-query-flat"),
]


@pytest.mark.parametrize("seed,lead,lam,scale", GRAD)
def test_mp_gradients_match_autograd(seed, lead, lam, scale):
    """Central differences in mp (error ~1e-40) against float64 autograd through
    lla_forward, whose own error is ~ kappa u ~ 1e-15 here: agreement to 1e-9 relative
    per tensor, dlambda included (summed over queries for a scalar lambda)."""
    S, D = 6, 3
    q, k, v = qkv(seed, S, D, lead)
    cot = qkv(seed + 1, S, D, lead)[0]
    scalar = not isinstance(lam, str)
    lam_t = torch.tensor(lam, dtype=F64) if scalar else torch.linspace(1.0, 4.0, S, dtype=F64).expand(*lead, S)
    G = lla_grad_mp(q, k, v, ridge_lambda=lam_t, qk_scale=scale, cotangent=cot)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lam_t)]
    o = lla_forward(*leaves[:3], ridge_lambda=leaves[3], qk_scale=scale)
    (o * cot).sum().backward()
    dl = G.dlambda.sum() if scalar else G.dlambda
    for name, mine, ref in [("dq", G.dq, leaves[0].grad), ("dk", G.dk, leaves[1].grad),
                            ("dv", G.dv, leaves[2].grad), ("dlambda", dl, leaves[3].grad)]:
        rel = (mine - ref).norm() / ref.norm()
        assert_within(f"mp {name} vs autograd", rel, torch.tensor(1e-9))


def test_mp_gradients_converged_in_step_and_precision():
    """(dps 60, step 1e-20) and (dps 80, step 1e-26) give the same float64 gradients to a
    few ulps: the finite differences have converged far below float64 resolution."""
    q, k, v = qkv(53, 5, 2)
    cot = qkv(54, 5, 2)[0]
    a = lla_grad_mp(q, k, v, ridge_lambda=0.7, cotangent=cot)
    b = lla_grad_mp(q, k, v, ridge_lambda=0.7, cotangent=cot, dps=80, step=1e-26)
    for name in ("dq", "dk", "dv", "dlambda"):
        x, y = getattr(a, name), getattr(b, name)
        assert_within(name, (x - y).abs(), 4 * U64 * y.abs().amax())


def test_mp_dlambda_one_sided_at_lambda_zero():
    """At lambda = 0 (rows i >= D defined) the derivative is one-sided. It has converged
    in the step (1e-20 and 1e-25 agree to 4 ulps), and it is continuous with the
    two-sided one at lambda = 1e-19: 1e-9 relative, although row i = D, which
    interpolates its D + 1 keys exactly at lambda = 0, has dL/dlambda ~ 8e12 and
    d2L/dlambda2 ~ 6e21 there (a change of ~7e-11 relative over 1e-19)."""
    q, k, v = qkv(55, 6, 2)
    cot = qkv(56, 6, 2)[0]
    a = lla_grad_mp(q, k, v, ridge_lambda=0.0, cotangent=cot)
    b = lla_grad_mp(q, k, v, ridge_lambda=1e-19, cotangent=cot)
    late = torch.arange(6) >= 2
    assert torch.isnan(a.dlambda[~late]).all()
    assert_within("one-sided dlambda vs two-sided at 1e-19", (a.dlambda - b.dlambda).abs()[late],
                  1e-9 * b.dlambda.abs()[late])
    c = lla_grad_mp(q, k, v, ridge_lambda=0.0, cotangent=cot, dps=80, step=1e-25)
    assert_within("one-sided dlambda, step 1e-20 vs 1e-25", (a.dlambda - c.dlambda).abs()[late],
                  4 * U64 * c.dlambda.abs()[late])


@pytest.mark.parametrize("seed,lead,lam,scale", GRAD)
def test_mp_jvp_matches_forward_mode_and_grad(seed, lead, lam, scale):
    """lla_jvp_mp against autograd's jvp of lla_forward (1e-9 relative), and against the
    mp gradient through <cotangent, jvp> = <grad, tangent> (both mp: 1e-13 relative,
    limited by the float64 rounding of the returned values)."""
    S, D = 6, 3
    q, k, v = qkv(seed, S, D, lead)
    lam_t = torch.full((*lead, S), float(lam), dtype=F64) if not isinstance(lam, str) else \
        torch.linspace(1.0, 4.0, S, dtype=F64).expand(*lead, S).clone()
    tq, tk, tv = qkv(seed + 2, S, D, lead)
    tl = torch.randn(*lead, S, generator=torch.Generator().manual_seed(seed), dtype=F64)
    J = lla_jvp_mp(q, k, v, ridge_lambda=lam_t, qk_scale=scale, tangents=(tq, tk, tv, tl))
    _, Jt = torch.autograd.functional.jvp(lambda a, b, c, l: lla_forward(a, b, c, ridge_lambda=l, qk_scale=scale),
                                          (q, k, v, lam_t), (tq, tk, tv, tl))
    assert_within("mp jvp vs autograd jvp", (J - Jt).norm() / Jt.norm(), torch.tensor(1e-9))
    cot = qkv(seed + 1, S, D, lead)[0]
    G = lla_grad_mp(q, k, v, ridge_lambda=lam_t, qk_scale=scale, cotangent=cot)
    lhs = (cot * J).sum()
    terms = torch.stack([(G.dq * tq).sum(), (G.dk * tk).sum(), (G.dv * tv).sum(), (G.dlambda * tl).sum()])
    assert_within("<cot, jvp> = <grad, t>", (lhs - terms.sum()).abs(), 1e-13 * terms.abs().sum())


# --------------------------------------------------------------------------- arguments


def _small():
    return qkv(60, 4, 2)


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda q, k, v: lla_forward_mp(q, k[:3], v, ridge_lambda=1.0), "^k: expected the shape of q",
                 id="forward-S_q-ne-S_k"),
    pytest.param(lambda q, k, v: lla_forward_mp(q, k, v, ridge_lambda=-1.0), "^ridge_lambda: expected values >= 0",
                 id="forward-lam-negative"),
    pytest.param(lambda q, k, v: lla_forward_mp(q.int(), k, v, ridge_lambda=1.0), "^q: expected a floating dtype",
                 id="forward-int"),
    pytest.param(lambda q, k, v: lla_forward_mp(q, k, v * float("nan"), ridge_lambda=1.0), "^v: expected finite",
                 id="forward-nan"),
    pytest.param(lambda q, k, v: lla_forward_mp(q, k, v, ridge_lambda=1.0, qk_scale=-2), "^qk_scale:",
                 id="forward-scale"),
    pytest.param(lambda q, k, v: lla_forward_mp(q, k, v, ridge_lambda=1.0, dps=10), "^dps: expected an int >= 20",
                 id="forward-dps-low"),
    pytest.param(lambda q, k, v: lla_forward_mp(q, k, v, ridge_lambda=1.0, dps=50.0), "^dps: expected an int",
                 id="forward-dps-float"),
    pytest.param(lambda q, k, v: lla_forward_details_mp(q, k, v, ridge_lambda=1.0, delta_eps=-1), "^delta_eps:",
                 id="details-delta-eps"),
    pytest.param(lambda q, k, v: lla_grad_mp(q, k, v, ridge_lambda=1.0, cotangent=q[:, :1].T),
                 "^cotangent: shape .* does not broadcast", id="grad-cotangent-shape"),
    pytest.param(lambda q, k, v: lla_grad_mp(q, k, v, ridge_lambda=1.0, cotangent=q, step=0.0), "^step: expected",
                 id="grad-step-zero"),
    pytest.param(lambda q, k, v: lla_grad_mp(q, k, v, ridge_lambda=1.0, cotangent=q, step=1e-55),
                 "^step: .* fewer than 10", id="grad-step-too-small-for-dps"),
    pytest.param(lambda q, k, v: lla_jvp_mp(q, k, v, ridge_lambda=1.0, tangents=(q, k)), "^tangents: expected a tuple",
                 id="jvp-tangents-arity"),
    pytest.param(lambda q, k, v: lla_jvp_mp(q, k, v, ridge_lambda=1.0, tangents=(None, None, None, q)),
                 r"^tangents\[3\] \(tlam\): shape", id="jvp-tlam-shape"),
])
def test_mp_argument_errors(call, match):
    q, k, v = _small()
    with pytest.raises(LLAInputError, match=match):
        call(q, k, v)


def test_refuses_large_problems_unless_forced():
    q, k, v = qkv(61, 256, 16)
    with pytest.raises(LLAInputError, match="^lla_forward_mp: problem too large .* force=True"):
        lla_forward_mp(q, k, v, ridge_lambda=1.0)
    q, k, v = qkv(62, 9, 3)
    with pytest.raises(LLAInputError, match=r"^lla_grad_mp: finite differences .* tiny problems"):
        lla_grad_mp(q, k, v, ridge_lambda=1.0, cotangent=v)
    # force lifts the limit (a size just past it, to stay fast)
    G = lla_grad_mp(q, k, v, ridge_lambda=1.0, cotangent=v, force=True, dps=40, step=1e-12)
    assert torch.isfinite(G.dq).all()
