"""Properties of the float64 oracles (lla_verify/oracles/float64.py): SPEC 3 identities, SPEC 4
limits, gradients, argument checks.

Every tolerance is a budget derived for the input at hand (unit roundoff u64 times a
condition estimate read from ``lla_forward_details``), and every comparison reports
error / budget. Where an operation sequence is exact in float64 the check is bitwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from lla_verify.oracles.float64 import (
    lla_forward,
    lla_forward_details,
    lla_forward_wls,
    mesanet_attention,
    softmax_attention,
)
from lla_contract import LLAInputError

F64 = torch.float64
U64 = 2.0**-53


# --------------------------------------------------------------------------- helpers


def gauss(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def qkv(seed, S, D, lead=(), Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, S, D, generator=g, dtype=F64)
    k = torch.randn(*lead, S, D, generator=g, dtype=F64)
    v = torch.randn(*lead, S, Dv or D, generator=g, dtype=F64)
    return q, k, v


def assert_within(label, err, budget, **context):
    """err <= budget elementwise (NaN in either fails); one line with the worst ratio."""
    __tracebackhide__ = True
    err, budget = torch.as_tensor(err, dtype=F64), torch.as_tensor(budget, dtype=F64).expand_as(err)
    ratio = err / budget
    bad = ~(err <= budget)
    if bool(bad.any()):
        worst = int(torch.nan_to_num(ratio, nan=math.inf).reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        ctx = ", ".join(f"{k}={v}" for k, v in context.items())
        pytest.fail(
            f"{label}: {int(bad.sum())} / {err.numel()} exceed the budget; worst at {idx}: "
            f"error {err[idx].item():.3e}, budget {budget[idx].item():.3e}, ratio {ratio[idx].item():.3g}"
            + (f" ({ctx})" if ctx else "")
        )


def fit_slope(x, y):
    """Least-squares slope of log y against log x."""
    lx, ly = torch.log(torch.as_tensor(x, dtype=F64)), torch.log(torch.as_tensor(y, dtype=F64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def per_pair(d, q, k):
    """w_ij, z_ij, f_ij = 1 - <z_ij, rho_i> rebuilt from the details (causal mask applied)."""
    S = q.shape[-2]
    a = d.scale * (q @ k.transpose(-1, -2))
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    w = torch.exp(a - d.m[..., None]).masked_fill(~mask, 0.0)
    z = k[..., None, :, :] - q[..., :, None, :]
    f = 1.0 - (z @ d.rho[..., :, :, None])[..., 0]
    return w, z, f


def solve_budget(d, q, k):
    """Bound on |delta_i (sum_j s_ij z_ij) - lambda_i omega_i rho_i| for the computed rho_i.

    sum_j w f z = mu - (Sigma - lambda omega I) rho exactly, so the left side minus
    lambda omega rho is the residual mu - Sigma rho of a backward-stable Cholesky solve,
    at most ~ (D+1) u |Sigma| |rho|, plus the rounding of the test's own sum
    ~ S u sum_j w |z| (1 + |z||rho|). A factor 8 covers the constants.
    """
    D, S = q.shape[-1], q.shape[-2]
    w, z, f = per_pair(d, q, k)
    zn = z.norm(dim=-1)
    rn = d.rho.norm(dim=-1)
    sig_norm = (w * zn * zn).sum(-1) + d.lam * d.omega
    terms = (w * zn * (1 + zn * rn[..., None])).sum(-1)
    return 8 * (D + 1 + S) * U64 * (sig_norm * rn + terms)


def oracle_budget(d, vmax):
    """Forward-error budget of a float64 LLA oracle at query i, absolute, per row.

    A Cholesky/LU solve loses kappa(Sigma_i) u; normalising by delta_i, a difference
    of terms as large as omega_i, loses another omega_i / delta_i. (D+1) for the
    solve's length, 8 for the handful of roundings around it. Scaled by max |v|.
    """
    D = d.mu.shape[-1]
    return 8 * (D + 1) * U64 * d.kappa * (d.omega / d.delta) * vmax


# --------------------------------------------------------------------------- two formulations


def _per_query_lam(S, lo, hi):
    return torch.logspace(lo, hi, S, dtype=F64)


AGREE_CASES = [
    pytest.param(0, 24, 4, (), 0.1, None, id="gauss-S24-D4-lam0.1"),
    pytest.param(1, 33, 8, (2,), 1e-3, 0.5, id="gauss-S33-D8-B2-lam1e-3-scale0.5"),
    pytest.param(2, 20, 2, (1, 2), 0.0, None, id="lam0-S20-D2-BH"),
    pytest.param(3, 40, 4, (), "decades", None, id="per-query-lambda-1e-6..1e2"),
    pytest.param(4, 17, 3, (), 10.0, 3.0, id="sharp-scale3-lam10-S17"),
    pytest.param(5, 16, 4, (), 1.0, 1e-4, id="flat-scale1e-4"),
    pytest.param(6, 24, 4, (), 1e-2, None, id="offset-8-cancellation"),
]


@pytest.mark.parametrize("seed,S,D,lead,lam,scale", AGREE_CASES)
def test_two_float64_formulations_agree(seed, S, D, lead, lam, scale):
    q, k, v = qkv(seed, S, D, lead)
    if seed == 6:
        q, k = q + 8.0, k + 8.0  # ||q|| >> ||k - q||: z_ij must be formed before products
    if lam == "decades":
        lam = _per_query_lam(S, -6, 2)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    w = lla_forward_wls(q, k, v, ridge_lambda=lam, qk_scale=scale)
    ok = ~d.undefined
    assert bool(ok.any())
    err = (d.o - w).abs().amax(-1)
    budget = oracle_budget(d, v.abs().amax())
    assert_within("rho/Schur vs WLS", err[ok], budget[ok], kappa_max=f"{d.kappa[ok].max().item():.2e}",
                  skipped_undefined=int((~ok).sum()))


# --------------------------------------------------------------------------- SPEC 3 identities

IDENTITY_CASES = [
    pytest.param(10, 16, 4, 1.0, None, id="S16-D4-lam1"),
    pytest.param(11, 23, 3, 1e-6, 2.0, id="S23-D3-lam1e-6-scale2"),
    pytest.param(12, 20, 4, 0.0, None, id="S20-D4-lam0"),
    pytest.param(13, 12, 8, "decades", 0.3, id="S12-D8-per-query-lambda"),
    pytest.param(14, 31, 2, 100.0, 5.0, id="S31-D2-lam100-sharp"),
]


def _lam(lam, S):
    return _per_query_lam(S, -8, 3) if lam == "decades" else lam


@pytest.mark.parametrize("seed,S,D,lam,scale", IDENTITY_CASES)
def test_partition_of_unity(seed, S, D, lam, scale):
    """Constant values give that constant back: sum_j s_ij = 1.

    o_i = (sum_j wf_ij c) / (sum_j wf_ij) with the same wf_ij: the two sums carry at
    most S u sum_j |wf_ij| each, so |o_i - c| <= 2 (S + 1) u |c| sum_j |wf_ij| / |den_i|.
    """
    q, k, _ = qkv(seed, S, D)
    c = torch.tensor([0.3, -1.7, 5.0], dtype=F64)
    v = c.expand(S, 3).clone()
    lam = _lam(lam, S)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    w, _, f = per_pair(d, q, k)
    amp = (w * f).abs().sum(-1) / (w * f).sum(-1).abs()
    ok = ~d.undefined
    err = (d.o - c).abs()
    budget = 2 * (S + 1) * U64 * c.abs() * amp[:, None]
    assert_within("partition of unity", err[ok], budget[ok])


@pytest.mark.parametrize("seed,S,D,lam,scale", IDENTITY_CASES)
def test_first_moment(seed, S, D, lam, scale):
    """sum_j s_ij z_ij = lambda_i omega_i rho_i / delta_i, s_ij rebuilt from the details."""
    q, k, v = qkv(seed, S, D)
    lam = _lam(lam, S)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    w, z, f = per_pair(d, q, k)
    s = w * f / d.delta[..., None]
    lhs = (s[..., None] * z).sum(-2)
    rhs = (d.lam * d.omega / d.delta)[..., None] * d.rho
    ok = ~d.undefined
    err = (lhs - rhs).abs().amax(-1)
    budget = solve_budget(d, q, k) / d.delta.abs()
    assert_within("first moment", err[ok], budget[ok])


@pytest.mark.parametrize("seed,S,D,scale", [
    pytest.param(20, 16, 4, None, id="S16-D4"),
    pytest.param(21, 25, 3, 0.2, id="S25-D3-scale0.2"),
    pytest.param(22, 12, 8, 1.5, id="S12-D8-scale1.5"),
])
def test_linear_values_reproduced_at_lambda0(seed, S, D, scale):
    """v_j = A k_j + b gives o_i = A q_i + b at lambda = 0 for every i >= D.

    o_i - (A q_i + b) = A sum_j s_ij z_ij + (A q_i + b)(sum_j s_ij - 1) + the rounding
    of v itself: the first-moment budget times |A|, the partition budget times
    |A q_i + b|, and u |v|.
    """
    q, k, _ = qkv(seed, S, D)
    A = gauss(seed + 100, 3, D)
    b = gauss(seed + 200, 3)
    v = k @ A.T + b
    d = lla_forward_details(q, k, v, ridge_lambda=0.0, qk_scale=scale)
    assert torch.equal(d.undefined, torch.arange(S) < D)
    w, _, f = per_pair(d, q, k)
    want = q @ A.T + b
    amp = (w * f).abs().sum(-1) / (w * f).sum(-1).abs()
    budget = (A.abs().sum(-1) * (solve_budget(d, q, k) / d.delta.abs())[:, None]
              + 2 * (S + 1) * U64 * amp[:, None] * want.abs() + 4 * D * U64 * v.abs().amax())
    late = torch.arange(S) >= D
    assert_within("linear values at lambda 0", (d.o - want).abs()[late], budget[late])


def _dyadic(seed, *shape, bits=6, span=4.0):
    """Gaussian-like values on the grid 2^-bits within +-span: sums and products stay exact."""
    x = gauss(seed, *shape).clamp(-span, span)
    return torch.round(x * 2**bits) / 2**bits


@pytest.mark.parametrize("T", [
    pytest.param(3.0, id="shift-small"),
    pytest.param(40.0, id="shift-past-exp-overflow"),
    pytest.param(-40.0, id="shift-negative-past-underflow"),
])
def test_shift_invariance(T):
    """o does not depend on a per-row constant added to the scores.

    Construction: keys share their last coordinate c0; moving q and k by t = T e_D
    leaves z_ij = k_j - q_i unchanged and adds s T (c0 + q_iD + T), constant over j, to
    every score of row i. Inputs sit on a dyadic grid and s = 1/4, so every score,
    shift and difference is exact in float64: the output must be bitwise identical.
    With |T| = 40 the shift is ~ +-400 to 1600, where exp without the max subtraction
    would overflow or underflow.
    """
    S, D = 16, 4
    q, k, v = _dyadic(30, S, D), _dyadic(31, S, D), gauss(32, S, 3)
    k[:, -1] = 1.5
    t = torch.zeros(D, dtype=F64)
    t[-1] = T
    base = lla_forward(q, k, v, ridge_lambda=0.5, qk_scale=0.25)
    moved = lla_forward(q + t, k + t, v, ridge_lambda=0.5, qk_scale=0.25)
    shift = 0.25 * T * (1.5 + q[:, -1] + T)
    assert shift.abs().max() > 0
    assert torch.isfinite(base).all()
    assert torch.equal(base, moved), f"max |diff| {(base - moved).abs().max().item():.3e}"


@pytest.mark.parametrize("seed,S,D,lam,scale", [
    pytest.param(40, 20, 4, 1.0, None, id="lam1"),
    pytest.param(41, 20, 4, 1e-12, None, id="lam1e-12"),
    pytest.param(42, 20, 4, 1e6, None, id="lam1e6"),
    pytest.param(43, 33, 3, "decades", 4.0, id="per-query-sharp"),
    pytest.param(44, 16, 8, 0.1, 1e-3, id="flat"),
])
def test_delta_positive_and_at_most_omega(seed, S, D, lam, scale):
    """0 < delta_i <= omega_i for lambda > 0; the upper bound to 2 (S + D) u relative."""
    q, k, v = qkv(seed, S, D)
    lam = _lam(lam, S)
    d = lla_forward_details(q, k, v, ridge_lambda=lam, qk_scale=scale)
    assert bool((d.delta > 0).all()), f"delta <= 0 at {(d.delta <= 0).nonzero().tolist()}"
    over = (d.delta - d.omega).clamp_min(0)
    assert_within("delta <= omega", over, 2 * (S + D) * U64 * d.omega)


@pytest.mark.parametrize("lam", [
    pytest.param(1.0, id="lam1"),
    pytest.param(1e-12, id="lam1e-12"),
    pytest.param(1e8, id="lam1e8"),
    # kappa(Sigma_0) = 1 + |z|^2 / lambda ~ 1e31: <z, rho> rounds to exactly 1, f = 0,
    # and the float64 oracle returns 0/0 = NaN without marking the row undefined
    # (reported; lla_forward_mp returns v_0 there, see test_oracle_mp.py).
])
@pytest.mark.parametrize("scale", [pytest.param(None, id="default"), pytest.param(30.0, id="scale30")])
def test_first_token_returns_v0(lam, scale):
    """o_0 = (w f v_0) / (w f): two roundings, so |o_0 - v_0| <= 2 u |v_0|."""
    q, k, v = qkv(50, 9, 4, lead=(2,))
    o = lla_forward(q, k, v, ridge_lambda=lam, qk_scale=scale)
    assert_within("o_0 = v_0", (o[..., 0, :] - v[..., 0, :]).abs(), 2 * U64 * v[..., 0, :].abs())


def test_unresolvable_rows_are_flagged_not_silent():
    """lambda = 1e-30 at the first token: exact o_0 = v_0, but every f rounds to 0 in
    float64 (kappa ~ 1e31). The oracle must flag the row rather than return an
    unflagged NaN; the mpmath oracle resolves it (test_oracle_mp)."""
    q, k, v = qkv(50, 9, 4, lead=(2,))
    d = lla_forward_details(q, k, v, ridge_lambda=1e-30)
    nan_rows = torch.isnan(d.o).any(-1)
    assert torch.equal(nan_rows, d.undefined), "every NaN row must be marked undefined"
    ok = ~d.undefined[..., 0]
    assert bool(((d.o[..., 0, :] - v[..., 0, :]).abs() <= 2 * U64 * v[..., 0, :].abs())[ok].all())


@pytest.mark.parametrize("S,D,lam_pattern", [
    pytest.param(12, 4, "all-zero", id="D4-lam0"),
    pytest.param(12, 1, "all-zero", id="D1-lam0"),
    pytest.param(20, 8, "all-zero", id="D8-lam0"),
    pytest.param(12, 4, "zero-at-odd", id="D4-lam0-at-odd-positions"),
])
def test_undefined_exactly_at_early_tokens(S, D, lam_pattern):
    q, k, v = qkv(60 + D, S, D)
    i = torch.arange(S)
    lam = torch.zeros(S, dtype=F64) if lam_pattern == "all-zero" else (i % 2 == 0).to(F64)
    d = lla_forward_details(q, k, v, ridge_lambda=lam)
    want = (lam == 0) & (i < D)
    assert torch.equal(d.undefined, want), f"undefined rows {i[d.undefined].tolist()}, want {i[want].tolist()}"
    o = lla_forward(q, k, v, ridge_lambda=lam)
    assert torch.equal(torch.isnan(o).any(-1), want)
    assert torch.equal(torch.isnan(o).all(-1), want)


@pytest.mark.parametrize("seed,lam,scale", [
    pytest.param(70, 0.5, None, id="lam0.5"),
    pytest.param(71, 0.0, 2.0, id="lam0-sharp"),
    pytest.param(72, 1e-9, 0.1, id="lam1e-9-flat"),
])
def test_linear_in_v(seed, lam, scale):
    """o(a v1 + b v2) = a o(v1) + b o(v2): same weights, only the final contraction and
    the forming of a v1 + b v2 round: <= 3 (S + 2) u sum_j |s_ij| (|a v1_j| + |b v2_j|)."""
    S, D = 18, 4
    q, k, v1 = qkv(seed, S, D)
    v2 = gauss(seed + 1, S, D)
    a, b = 0.7, -3.1
    o = lla_forward(q, k, a * v1 + b * v2, ridge_lambda=lam, qk_scale=scale)
    o12 = a * lla_forward(q, k, v1, ridge_lambda=lam, qk_scale=scale) + b * lla_forward(
        q, k, v2, ridge_lambda=lam, qk_scale=scale)
    d = lla_forward_details(q, k, v1, ridge_lambda=lam, qk_scale=scale)
    w, _, f = per_pair(d, q, k)
    s_abs = (w * f).abs() / (w * f).sum(-1, keepdim=True).abs()
    mag = s_abs @ (abs(a) * v1.abs() + abs(b) * v2.abs())
    ok = ~d.undefined
    assert_within("linearity in v", (o - o12).abs()[ok], (3 * (S + 2) * U64 * mag)[ok])
    assert torch.equal(torch.isnan(o).any(-1), d.undefined)


@pytest.mark.parametrize("t0", [pytest.param(0, id="after-first"), pytest.param(6, id="mid"),
                                pytest.param(18, id="before-last")])
@pytest.mark.parametrize("chunk_bytes", [pytest.param(None, id="one-chunk"), pytest.param(3000, id="small-chunks")])
@pytest.mark.parametrize("fn", [pytest.param(lla_forward, id="schur"), pytest.param(lla_forward_wls, id="wls")])
def test_causality_bitwise(t0, chunk_bytes, fn):
    """Changing tokens j > t0 (q, k and v) leaves o_0..o_t0 bitwise unchanged."""
    S, D = 20, 4
    q, k, v = qkv(80, S, D)
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    lam = torch.linspace(0.1, 2, S, dtype=F64)
    o = fn(q, k, v, ridge_lambda=lam, **kw)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[t0 + 1:] = 30 * gauss(81, S - t0 - 1, D)
    k2[t0 + 1:] = -k2[t0 + 1:] * 1e3
    v2[t0 + 1:] = 1e6
    lam2 = lam.clone()
    lam2[t0 + 1:] = 1e-7
    o2 = fn(q2, k2, v2, ridge_lambda=lam2, **kw)
    assert torch.equal(o[: t0 + 1], o2[: t0 + 1])
    assert not torch.equal(o[t0 + 1:], o2[t0 + 1:])  # the change did reach the future rows


@pytest.mark.parametrize("fn", [pytest.param(lla_forward, id="schur"), pytest.param(lla_forward_wls, id="wls")])
@pytest.mark.parametrize("lam_shape", [pytest.param("scalar", id="lam-scalar"), pytest.param("BHS", id="lam-BHS"),
                                       pytest.param("H1S", id="lam-per-head-H1S"), pytest.param("S", id="lam-S")])
def test_batch_and_head_independence(fn, lam_shape):
    """Each (b, h) slice equals the call on that slice alone, bitwise; changing one
    slice leaves the others bitwise unchanged."""
    B, H, S, D = 2, 3, 11, 4
    q, k, v = qkv(90, S, D, lead=(B, H))
    full = {"scalar": torch.tensor(0.3, dtype=F64), "BHS": torch.rand(B, H, S, dtype=F64) + 0.1,
            "H1S": torch.rand(H, 1, dtype=F64) + 0.1, "S": torch.rand(S, dtype=F64) + 0.1}[lam_shape]
    lam_b = torch.broadcast_to(full, (B, H, S))
    o = fn(q, k, v, ridge_lambda=full)
    for b in range(B):
        for h in range(H):
            assert torch.equal(o[b, h], fn(q[b, h], k[b, h], v[b, h], ridge_lambda=lam_b[b, h])), (b, h)
    q2 = q.clone()
    q2[1, 2] = gauss(91, S, D)
    o2 = fn(q2, k, v, ridge_lambda=full)
    keep = torch.ones(B, H, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(o[keep], o2[keep])
    assert not torch.equal(o[1, 2], o2[1, 2])


# --------------------------------------------------------------------------- SPEC 4 limits


@pytest.mark.parametrize("seed,S,D,scale", [
    pytest.param(100, 16, 4, None, id="S16-D4"),
    pytest.param(101, 9, 2, 2.0, id="S9-D2-scale2"),
])
def test_large_lambda_is_softmax_at_rate_one_over_lambda(seed, S, D, scale):
    """lambda -> inf: o - softmax = C / lambda + O(1/lambda^2); the log-log slope over
    lambda in 1e2..1e5 is -1 up to the O(1/lambda) relative term (<= 0.05 here), and
    lambda * error settles (varies by < 10% across the range)."""
    q, k, v = qkv(seed, S, D, lead=(2,))
    sm = softmax_attention(q, k, v, qk_scale=scale)
    lams = torch.logspace(2, 5, 7, dtype=F64)
    errs = torch.stack([(lla_forward(q, k, v, ridge_lambda=float(l), qk_scale=scale) - sm).abs().max()
                        for l in lams])
    slope = fit_slope(lams, errs)
    assert abs(slope + 1) < 0.05, f"slope {slope:.4f}, errors {errs.tolist()}"
    c = errs * lams
    assert float(c.max() / c.min()) < 1.1, f"lambda * error {c.tolist()}"


@pytest.mark.parametrize("lam", [pytest.param(1e-3, id="lam1e-3"), pytest.param(1.0, id="lam1"),
                                 pytest.param(10.0, id="lam10")])
def test_small_scale_is_mesanet_at_rate_scale(lam):
    """s -> 0: w_ij = 1 + O(s), so o - mesanet = O(s): log-log slope 1 over s in 1e-7..1e-3.

    At s = 1e-7 the difference is ~1e-6; float64 rounding of that size would bend the
    fit away from 1, so the slope check also bounds the oracles' error there.
    """
    q, k, v = qkv(110, 16, 4, lead=(2,))
    me = mesanet_attention(q, k, v, ridge_lambda=lam)
    ss = torch.logspace(-7, -3, 5, dtype=F64)
    errs = torch.stack([(lla_forward(q, k, v, ridge_lambda=lam, qk_scale=float(s)) - me).abs().max() for s in ss])
    slope = fit_slope(ss, errs)
    assert abs(slope - 1) < 0.05, f"slope {slope:.4f}, errors {errs.tolist()}"


@pytest.mark.parametrize("seed", [pytest.param(120, id="seed120"), pytest.param(121, id="seed121")])
def test_large_scale_is_hard_attention(seed):
    """s -> inf with a unique argmax j*: o_i - v_j* ~ exp(-s g_i), g_i the gap between the
    two best scores <q_i, k_j>: the slope of ln|o_i - v_j*| against s g_i is -1 (within
    0.1 over s g_i in 6..26, where later keys' terms have decayed); at s g_i = 800 every
    other weight underflows to 0 and o_i = v_j* to 2 u."""
    S, D = 8, 4
    q, k, v = qkv(seed, S, D)
    raw = q @ k.T
    for i in range(1, S):
        top = raw[i, : i + 1].sort(descending=True).values
        gap = float(top[0] - top[1])
        js = int(raw[i, : i + 1].argmax())
        ts = torch.tensor([6.0, 10, 14, 18, 22, 26], dtype=F64)
        errs = [float((lla_forward(q, k, v, ridge_lambda=1.0, qk_scale=float(t) / gap)[i] - v[js]).norm())
                for t in ts]
        y = torch.log(torch.tensor(errs, dtype=F64))
        slope = float(((ts - ts.mean()) * (y - y.mean())).sum() / ((ts - ts.mean()) ** 2).sum())
        assert abs(slope + 1) < 0.1, f"row {i}: slope {slope:.3f} vs -1, errors {errs}"
        o = lla_forward(q, k, v, ridge_lambda=1.0, qk_scale=800 / gap)
        assert_within(f"hard attention row {i}", (o[i] - v[js]).abs(), 2 * U64 * v[js].abs())


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn", [pytest.param(lla_forward, id="schur"), pytest.param(lla_forward_wls, id="wls")])
@pytest.mark.parametrize("scale", [pytest.param(None, id="default-scale"), pytest.param(2.0, id="scale2")])
def test_gradcheck(fn, scale):
    """Central differences of step 1e-6 in float64 err by ~ u |o| / 1e-6 + 1e-12 |o'''|,
    ~1e-10 for |o| ~ 1; atol 1e-7 and rtol 1e-6 leave a 1000x margin and still catch a
    wrong derivative (a relative error of 1e-6 or more)."""
    S, D = 6, 3
    q, k, v = (t.requires_grad_() for t in qkv(130, S, D))
    lam = (torch.linspace(0.5, 2.0, S, dtype=F64)).requires_grad_()

    def f(q, k, v, lam):
        return fn(q, k, v, ridge_lambda=lam, qk_scale=scale)

    assert torch.autograd.gradcheck(f, (q, k, v, lam), eps=1e-6, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------- argument checks


def _args(S=5, D=4):
    return qkv(140, S, D)


def _bad_inputs():
    q, k, v = _args()
    nan_k = k.clone()
    nan_k[2, 1] = float("nan")
    inf_v = v.clone()
    inf_v[0, 0] = float("inf")
    return [
        pytest.param(dict(k=k[:, :3]), "^k: expected the shape of q", id="k-D-mismatch"),
        pytest.param(dict(k=_args(6)[1]), "^k: expected the shape of q", id="S_q-ne-S_k"),
        pytest.param(dict(v=_args(6)[2]), "^v: expected leading shape", id="v-S-mismatch"),
        pytest.param(dict(q=q[:, :0], k=k[:, :0]), "^q: head dimension D must be >= 1", id="D0"),
        pytest.param(dict(q=q[:0], k=k[:0], v=v[:0]), "^q: sequence length S must be >= 1", id="S0"),
        pytest.param(dict(q=q[0]), "^q: expected shape .* at least 2 dims", id="q-1d"),
        pytest.param(dict(k=nan_k), "^k: expected finite values", id="k-nan"),
        pytest.param(dict(v=inf_v), "^v: expected finite values", id="v-inf"),
        pytest.param(dict(q=q.to(torch.int64)), "^q: expected a floating dtype", id="q-int64"),
        pytest.param(dict(v=v.to(torch.int32)), "^v: expected a floating dtype", id="v-int32"),
        pytest.param(dict(q=q.tolist()), "^q: expected a torch.Tensor", id="q-list"),
        pytest.param(dict(ridge_lambda=-1e-3), "^ridge_lambda: expected values >= 0", id="lam-negative"),
        pytest.param(dict(ridge_lambda=torch.tensor([1.0, -1, 1, 1, 1], dtype=F64)), "^ridge_lambda: expected values >= 0",
                     id="lam-tensor-negative"),
        pytest.param(dict(ridge_lambda=float("nan")), "^ridge_lambda: expected finite", id="lam-nan"),
        pytest.param(dict(ridge_lambda=torch.ones(4, dtype=F64)), "^ridge_lambda: shape .* does not broadcast",
                     id="lam-bad-shape"),
        pytest.param(dict(ridge_lambda=torch.ones(5, dtype=torch.int64)), "^ridge_lambda: expected a floating tensor",
                     id="lam-int-tensor"),
        pytest.param(dict(ridge_lambda="big"), "^ridge_lambda: expected a float", id="lam-str"),
        pytest.param(dict(qk_scale=-1.0), "^qk_scale: expected a finite value >= 0", id="scale-negative"),
        pytest.param(dict(qk_scale=float("inf")), "^qk_scale: expected a finite value >= 0", id="scale-inf"),
        pytest.param(dict(qk_scale=float("nan")), "^qk_scale: expected a finite value >= 0", id="scale-nan"),
        pytest.param(dict(qk_scale="x"), "^qk_scale: expected a float >= 0 or None", id="scale-str"),
        pytest.param(dict(delta_eps=-1.0), "^delta_eps: expected a finite value >= 0", id="delta-eps-negative"),
    ]


@pytest.mark.parametrize("fn", [pytest.param(lla_forward, id="schur"), pytest.param(lla_forward_details, id="details"),
                                pytest.param(lla_forward_wls, id="wls")])
@pytest.mark.parametrize("override,match", _bad_inputs())
def test_input_validation(fn, override, match):
    q, k, v = _args()
    kw = dict(q=q, k=k, v=v, ridge_lambda=1.0)
    kw.update(override)
    with pytest.raises(LLAInputError, match=match):
        fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


def test_wls_refuses_delta_eps():
    q, k, v = _args()
    with pytest.raises(ValueError, match="^delta_eps: the WLS formulation"):
        lla_forward_wls(q, k, v, ridge_lambda=1.0, delta_eps=1e-12)


# --------------------------------------------------------------------------- large smoke


def test_smoke_S512_D64():
    """The one large size: both formulations agree within the derived budget, o_0 = v_0."""
    q, k, v = qkv(150, 512, 64, lead=(1, 1))
    d = lla_forward_details(q, k, v, ridge_lambda=1.0)
    w = lla_forward_wls(q, k, v, ridge_lambda=1.0)
    assert torch.isfinite(d.o).all() and not d.undefined.any()
    assert_within("S512 schur vs wls", (d.o - w).abs().amax(-1), oracle_budget(d, v.abs().amax()))
    assert_within("S512 o_0", (d.o[..., 0, :] - v[..., 0, :]).abs(), 2 * U64 * v[..., 0, :].abs())


def test_mesanet_lambda_zero_is_a_clear_error():
    # lambda = 0 leaves query 0's augmented Gram matrix [k0;1][k0;1]^T rank one: the
    # error names ridge_lambda and the query, instead of torch's LinAlgError
    q, k, v = qkv(130, 6, 4)
    with pytest.raises(LLAInputError, match=r"ridge_lambda: .*query 0 .*singular"):
        mesanet_attention(q, k, v, ridge_lambda=0.0)
