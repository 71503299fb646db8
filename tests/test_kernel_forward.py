"""The lla_triton forward kernel against the float64 oracle, with derived tolerances.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1) at small sizes, and
compiled on a CUDA device (where the `gpu`-marked cases add real sizes).

Every comparison is per query i on the inputs as rounded to the kernel's dtype:

    err_i   = ||o_i - o_i^{f64}||
    model_i = (cg_tol + u_c sqrt(n_i)) solv_i      the solve: stopping at relative residual
                                                   cg_tol, and rounding in the matvecs
            + u_c sqrt(n_i) sens_i                 rounding of the data path (JVP estimate)
            + u_out ||o_i||                        rounding of the output
            + u_c sqrt(n_i) max_j ||v_j||          floor for outputs near zero

with u_c = 2^-24 (fp32 compute), u_out the unit roundoff of the output dtype,
n_i = (i+1) D the accumulation length (probabilistic rounding: sqrt(n) u), solv_i the
oracle's output change per unit relative residual, sens_i the largest JVP of the oracle
along a random sign direction of unit componentwise relative size (one direction:
the oracle's forward-mode AD dominates the CPU time of this file). Checked:
err_i <= C_MODEL * model_i. Second, FlashAttention's rule: over a whole case,
||o - o^{f64}|| <= C_DENSE * ||o_dense - o^{f64}|| + u_out ||o^{f64}||, where o_dense is the
same dense computation in fp32 (an LU solve per query) on the same inputs.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch.func import jvp

from lla_verify.oracles.dense import dense_torch_lla

from lla_verify.registry.precision import unit_roundoff
from lla_verify.oracles.float64 import lla_forward, lla_forward_details, softmax_attention
from lla_contract import LLAInputError

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = [
    pytest.mark.interp,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device or TRITON_INTERPRET=1 (CPU interpreter)"),
]

if DEVICE is not None:
    import lla_triton

U_C = 2.0**-24
# The model terms are first-order estimates (sens and solv are sampled/normed, not
# worst-case bounds) and sqrt(n) is the probabilistic, not the worst-case, growth:
# 4 covers the slack those estimates leave, as LAPACK's THRESH-style ratio tests do.
C_MODEL = 4.0
# FlashAttention's rule allows 2x a same-precision reference; ours also stops CG at
# cg_tol, whose error (cg_tol solv_i) is of the order of the dense LU's rounding on
# these inputs, hence 2 x 2.
C_DENSE = 4.0


def _inputs(B, H, S, D, dtype, *, offset=0.0, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    if offset:
        c = torch.randn(D, generator=g)
        c = c / c.norm() * offset
        q, k = q + c, k + c
    return tuple(t.to(dtype).to(device or DEVICE) for t in (q, k, v))


def _sensitivity(q, k, v, lam, directions=1, seed=1):
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    lam = torch.as_tensor(lam, dtype=torch.float64, device=q.device).expand(q.shape[:-1]).clone()
    g = torch.Generator().manual_seed(seed)

    def f(q_, k_, v_, l_):
        return lla_forward(q_, k_, v_, ridge_lambda=l_)

    best = None
    for _ in range(directions):
        signs = [(torch.randint(0, 2, t.shape, generator=g) * 2 - 1).to(t) for t in (q, k, v, lam)]
        _, do = jvp(f, (q, k, v, lam), tuple(s * t for s, t in zip(signs, (q, k, v, lam))))
        n = do.norm(dim=-1)
        best = n if best is None else torch.maximum(best, n)
    return best


def _check_against_oracle(q, k, v, lam, o, *, cg_tol, dense=True, sens=True, residual=None):
    """Both checks of the module docstring; returns the oracle details."""
    __tracebackhide__ = True
    d = lla_forward_details(q, k, v, ridge_lambda=lam)
    S, D = q.shape[-2], q.shape[-1]
    u_out = unit_roundoff(q.dtype)
    ok = ~d.undefined
    assert bool(torch.isfinite(o).all()), "kernel output has NaN/Inf"
    err = (o.to(torch.float64) - d.o).norm(dim=-1)
    root_n = (torch.arange(1, S + 1, dtype=torch.float64, device=q.device) * D).sqrt()
    vmax = v.to(torch.float64).norm(dim=-1).amax(-1, keepdim=True)
    model = (cg_tol + U_C * root_n) * torch.nan_to_num(d.solv, nan=0.0) + u_out * d.o.norm(dim=-1) \
        + U_C * root_n * vmax
    if sens:
        model = model + U_C * root_n * _sensitivity(q, k, v, lam)
    ratio = torch.where(ok, err / (C_MODEL * model), torch.zeros_like(err))
    worst = torch.unravel_index(ratio.argmax(), ratio.shape)
    w = tuple(int(x) for x in worst)
    assert ratio.max() <= 1.0, (
        f"kernel error exceeds the derived model: ratio {ratio.max():.3g} at (b, h, i) = {w}; "
        f"err {err[w]:.3g}, model {model[w]:.3g}, kappa {d.kappa[w]:.3g}, solv {d.solv[w]:.3g}"
    )
    if dense:
        od = dense_torch_lla(q, k, v, ridge_lambda=lam)
        okx = ok[..., None]
        e_k = torch.where(okx, o.to(torch.float64) - d.o, 0.0).norm()
        e_d = torch.where(okx, od.to(torch.float64) - d.o, 0.0).norm()
        allowed = C_DENSE * e_d + u_out * torch.where(okx, d.o, 0.0).norm()
        if residual is not None:
            # the dense LU has no stopping rule: the kernel's solve error is, to first
            # order, its measured true relative residual times the solver sensitivity
            solve = torch.where(ok, residual.double() * torch.nan_to_num(d.solv, nan=0.0), 0.0).norm()
            allowed = allowed + C_MODEL * solve
        assert e_k <= allowed, (
            f"kernel error {e_k:.3g} exceeds {C_DENSE} x the fp32 dense error {e_d:.3g} + output rounding "
            f"+ solve (allowed {allowed:.3g})"
        )
    return d


# ------------------------------------------------------------------------- accuracy
CASES = [
    # id, dtype, lambda, S, D, offset, preconditioner
    pytest.param(torch.float32, 10.0, 45, 16, 0.0, None, id="fp32-lam10-S45-D16"),
    pytest.param(torch.float32, 0.1, 45, 16, 0.0, None, id="fp32-lam0.1-S45-D16"),
    pytest.param(torch.float32, 1e-3, 45, 16, 0.0, None, id="fp32-lam1e-3-S45-D16"),
    pytest.param(torch.float32, 1e-3, 45, 16, 0.0, "jacobi", id="fp32-lam1e-3-jacobi"),
    pytest.param(torch.float32, 0.1, 17, 32, 0.0, None, id="fp32-lam0.1-S17-D32"),
    pytest.param(torch.bfloat16, 0.1, 45, 16, 0.0, None, id="bf16-lam0.1-S45-D16"),
    pytest.param(torch.bfloat16, 1e-3, 33, 16, 0.0, None, id="bf16-lam1e-3-S33-D16"),
    pytest.param(torch.bfloat16, 10.0, 17, 32, 0.0, None, id="bf16-lam10-S17-D32"),
    pytest.param(torch.float16, 0.1, 30, 16, 0.0, None, id="fp16-lam0.1-S30-D16"),
    pytest.param(torch.float32, 0.1, 33, 16, 100.0, None, id="fp32-offset100"),
    pytest.param(torch.bfloat16, 0.1, 33, 16, 100.0, None, id="bf16-offset100"),
    pytest.param(torch.float32, 0.1, 1, 16, 0.0, None, id="fp32-S1"),
]


@pytest.mark.parametrize("dtype, lam, S, D, offset, pre", CASES)
def test_forward_matches_oracle(dtype, lam, S, D, offset, pre):
    q, k, v = _inputs(1, 2, S, D, dtype, offset=offset, seed=S + D)
    o, st = lla_triton.lla_attention(q, k, v, ridge_lambda=lam, preconditioner=pre, return_stats=True)
    assert o.dtype == dtype and o.shape == q.shape
    _check_against_oracle(q, k, v, lam, o, cg_tol=lla_triton.DEFAULT_CG_TOL)
    assert int(st["cg_iters"].max()) < lla_triton.default_cg_max_iters(D)


def _two_tight_clusters(S, D, dtype, *, spread=2e-3, seed=3):
    """Queries and keys alternating between two tight clusters 10 apart: every tile
    holds rows far from its first row, while each row's z_ij are ~spread."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(2, D, generator=g)
    pick = centers[torch.arange(S) % 2]
    k = pick + spread * torch.randn(S, D, generator=g)
    q = k + spread * torch.randn(S, D, generator=g)
    v = torch.randn(S, D, generator=g)
    return tuple(t[None, None].to(dtype).to(DEVICE) for t in (q, k, v))


def test_rows_far_from_the_tile_anchor_are_reanchored():
    # Found by the property suite (clusters, ratio 38.8): one shared anchor per tile
    # made row 1 (other cluster) cancel 1e3-sized terms down to 7e-3, and CG met its
    # tolerance on a wrong matvec. Each such row is now solved around its own anchor.
    q, k, v = _two_tight_clusters(40, 16, torch.float32)
    o, st = lla_triton.lla_attention(q, k, v, ridge_lambda=1e-4, return_stats=True)
    rounds = st["anchor_rounds"][0, 0]
    assert int(rounds[1]) == 2 and int(rounds[0]) == 1, rounds
    _check_against_oracle(q, k, v, 1e-4, o, cg_tol=lla_triton.DEFAULT_CG_TOL, sens=False,
                          residual=st["cg_residual"])


def test_gaussian_rows_need_one_anchor():
    # the re-anchoring must cost nothing on ordinary inputs (docs/performance.md)
    q, k, v = _inputs(1, 2, 70, 32, torch.float32, seed=4)
    _, st = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, return_stats=True)
    assert int(st["anchor_rounds"].max()) == 1


def test_split_path_hands_offset_rows_to_the_anchored_path():
    # bf16 inputs take the split path, which expands around 0: Gaussian rows stay on it
    # (one round), rows at a common offset of 1e4 (r ~ 1e7 > SPLIT_RATIO) all go to a
    # second, anchored round (the GPU finding pinned in properties/regressions.json).
    q, k, v = _inputs(1, 2, 40, 16, torch.bfloat16, seed=4)
    _, st = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, return_stats=True)
    assert int(st["anchor_rounds"].max()) == 1
    q, k, v = _inputs(1, 2, 40, 16, torch.bfloat16, offset=1e4, seed=4)
    o, st = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, qk_scale=1e-4, return_stats=True)
    assert int(st["anchor_rounds"].min()) == 2, st["anchor_rounds"]
    assert bool(torch.isfinite(o).all())


def test_per_query_lambda_spanning_decades():
    q, k, v = _inputs(1, 2, 40, 16, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    # fp32 values, so kernel (fp32 lambda) and oracle (float64) see the same numbers
    lam = (10.0 ** (torch.rand(1, 2, 40, generator=g) * 4 - 3)).float().to(DEVICE)
    o = lla_triton.lla_attention(q, k, v, ridge_lambda=lam)
    _check_against_oracle(q, k, v, lam, o, cg_tol=lla_triton.DEFAULT_CG_TOL)
    # a (B, H, 1)-shaped lambda broadcasts along S
    lam_h = torch.tensor([[[0.5], [2.0]]], device=DEVICE)
    o2 = lla_triton.lla_attention(q, k, v, ridge_lambda=lam_h)
    _check_against_oracle(q, k, v, lam_h, o2, cg_tol=lla_triton.DEFAULT_CG_TOL, sens=False)


def test_rank3_is_one_head():
    q, k, v = _inputs(2, 1, 21, 16, torch.float32, seed=5)
    o4 = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1)
    o3 = lla_triton.lla_attention(q[:, 0], k[:, 0], v[:, 0], ridge_lambda=0.1)
    assert o3.shape == (2, 21, 16)
    torch.testing.assert_close(o3, o4[:, 0], rtol=0, atol=0)


def test_qk_scale_is_used():
    q, k, v = _inputs(1, 1, 20, 16, torch.float32, seed=6)
    o = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, qk_scale=0.7)
    d = lla_forward_details(q, k, v, ridge_lambda=0.1, qk_scale=0.7)
    err = (o.double() - d.o).norm(dim=-1)
    bound = C_MODEL * ((lla_triton.DEFAULT_CG_TOL + U_C * 20) * d.solv + U_C * 20 * 10 * d.o.norm(dim=-1) + 1e-6)
    assert bool((err <= bound).all())


# ------------------------------------------------------------------------- stats
def test_stats_fields_and_convergence():
    B, H, S, D = 1, 2, 37, 16
    q, k, v = _inputs(B, H, S, D, torch.float32, seed=7)
    tol = 1e-6
    o, st = lla_triton.lla_attention(q, k, v, ridge_lambda=1.0, cg_tol=tol, return_stats=True)
    assert set(st) == {"cg_iters", "cg_residual", "omega", "delta", "m", "fallback", "anchor_rounds"}
    # lambda = 1: delta_i / omega_i is far above any rounding, so no row falls back
    assert not bool(st["fallback"].any())
    for key, t in st.items():
        assert t.shape == (B, H, S), key
    assert st["cg_iters"].dtype == torch.int32
    assert st["cg_residual"].dtype == torch.float32
    d = lla_forward_details(q, k, v, ridge_lambda=1.0)
    # CG stopped by its own rule, well before the cap
    assert int(st["cg_iters"].max()) < lla_triton.default_cg_max_iters(D)
    assert int(st["cg_iters"].max()) <= 2 * D
    # the TRUE residual: the recursive one met tol; the two differ by the rounding of
    # a matvec, at most ~ sqrt(n) u kappa relative to ||mu|| (n = (i+1) D)
    root_n = (torch.arange(1, S + 1, dtype=torch.float64, device=q.device) * D).sqrt()
    res_bound = tol + 4 * U_C * root_n * d.kappa
    assert bool((st["cg_residual"].double() <= res_bound).all()), st["cg_residual"].max()
    # m, omega and delta agree with the oracle to fp32 rounding of the key passes
    torch.testing.assert_close(st["m"].double(), d.m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st["omega"].double(), d.omega, rtol=1e-5, atol=0)
    # delta_i = sum_j g_ij: its error relative to omega_i is the solve's (tol kappa) plus rounding
    dd = (st["delta"].double() - d.delta).abs() / d.omega
    assert bool((dd <= 4 * (tol * d.kappa + U_C * root_n * d.kappa)).all()), dd.max()
    # 0 < delta <= omega when lambda > 0
    assert bool((st["delta"] > 0).all()) and bool((st["delta"] <= st["omega"] * (1 + 1e-5)).all())


def test_cg_max_iters_caps_iterations():
    q, k, v = _inputs(1, 1, 30, 16, torch.float32, seed=8)
    _, st = lla_triton.lla_attention(q, k, v, ridge_lambda=1e-3, cg_max_iters=3, return_stats=True)
    assert int(st["cg_iters"].max()) == 3
    _, st0 = lla_triton.lla_attention(q, k, v, ridge_lambda=1e-3, cg_max_iters=0, return_stats=True)
    assert int(st0["cg_iters"].max()) == 0


# ------------------------------------------------------------------------- robustness and identities
@pytest.mark.parametrize("lam", [1e-12, 1e-6, 0.0], ids=["lam1e-12", "lam1e-6", "lam0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_nan_for_tiny_lambda_and_early_tokens(lam, dtype):
    """S < D: every token is early (rank-deficient sum w z z^T); delta_i/omega_i falls
    below fp32 resolution, and the delta guard must keep the output finite: a row whose
    den has no correct digit returns the softmax average, every other row divides."""
    q, k, v = _inputs(1, 1, 20, 32, dtype, seed=9)
    o, st = lla_triton.lla_attention(q, k, v, ridge_lambda=lam, return_stats=True)
    assert bool(torch.isfinite(o).all())
    assert bool(torch.isfinite(st["delta"]).all())
    fb = st["fallback"][0, 0]
    if lam == 0.0:
        # lambda = 0 with i + 1 <= D keys: the augmented Gram matrix is singular and
        # delta_i = 0 exactly, so every den is pure rounding and every row must fall back
        assert bool(fb.all()), fb
    # fallback rows are the softmax average: fp32 products (sqrt(n) u_c) and one rounding
    soft = softmax_attention(q, k, v)[0, 0]
    tol = 4 * (unit_roundoff(dtype) + U_C * math.sqrt(q.shape[-2])) * float(soft.abs().max())
    torch.testing.assert_close(o[0, 0][fb].double(), soft[fb], rtol=0, atol=tol)
    # rows that divided were not pure noise: |den_i| > delta_eps sum_j |g_ij| >= ... > 0
    assert bool((st["delta"][0, 0][~fb] != 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_first_token_is_v0(dtype):
    """o_0 = v_0 when lambda_0 > 0 (SPEC 3). Here g_00 = delta_0 = lambda/(|z_00|^2 + lambda),
    formed as 1 - <z, rho> in fp32: relative error ~ u_c (omega_0 / delta_0) sqrt(D) before
    the division, then the output is rounded."""
    lam = 0.1
    q, k, v = _inputs(1, 2, 1, 16, dtype, seed=13)
    o = lla_triton.lla_attention(q, k, v, ridge_lambda=lam)
    z2 = ((k - q).double() ** 2).sum(-1)
    amp = (z2 + lam) / lam
    bound = 4 * (U_C * 4 * amp + unit_roundoff(dtype)) * v.double().norm(dim=-1)
    err = (o.double() - v.double()).norm(dim=-1)
    assert bool((err <= bound).all()), (err / bound).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_partition_of_unity(dtype):
    """v_j = c for all j gives o_i = c: sum_j g_ij v_j / sum_j g_ij is c to rounding.

    The two sums run in different orders, so each carries a relative error of at most
    about sqrt(n) u_c sum_j |g_ij| / |sum_j g_ij| (probabilistic); then o is rounded.
    """
    B, H, S, D = 1, 2, 29, 16
    q, k, _ = _inputs(B, H, S, D, dtype, seed=10)
    c = torch.linspace(-2, 3, D)
    v = c.expand(B, H, S, D).to(dtype).to(DEVICE).contiguous()
    lam = 0.05
    o = lla_triton.lla_attention(q, k, v, ridge_lambda=lam)
    d = lla_forward_details(q, k, v, ridge_lambda=lam)
    q64, k64 = q.double(), k.double()
    a = d.scale * q64 @ k64.transpose(-1, -2)
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    w = torch.exp(a - d.m[..., None]).masked_fill(~mask, 0.0)
    z = k64[..., None, :, :] - q64[..., :, None, :]
    g = w * (1 - (z @ d.rho[..., None])[..., 0])
    amp = g.abs().sum(-1) / g.sum(-1).abs()
    root_n = (torch.arange(1, S + 1, dtype=torch.float64, device=q.device) * D).sqrt()
    c64 = v[0, 0, 0].double()
    err = (o.double() - c64).abs().amax(-1)
    bound = 4 * (U_C * root_n * amp + unit_roundoff(dtype)) * c64.abs().max()
    assert bool((err <= bound).all()), (err / bound).max()


def test_causality():
    q, k, v = _inputs(1, 1, 40, 16, torch.float32, seed=11)
    o = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1)
    k2, v2 = k.clone(), v.clone()
    k2[..., 25:, :] += 3.0
    v2[..., 25:, :] -= 5.0
    o2 = lla_triton.lla_attention(q, k2, v2, ridge_lambda=0.1)
    torch.testing.assert_close(o2[..., :25, :], o[..., :25, :], rtol=0, atol=0)
    assert not torch.equal(o2[..., 25:, :], o[..., 25:, :])


# ------------------------------------------------------------------------- argument errors
def _ok(dtype=torch.float32, S=8, D=16):
    return _inputs(1, 1, S, D, dtype, seed=12)


def test_errors_name_the_argument():
    q, k, v = _ok()
    with pytest.raises(LLAInputError, match="q: expected shape"):
        lla_triton.lla_attention(q[0, 0], k[0, 0], v[0, 0], ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="k: expected the shape of q"):
        lla_triton.lla_attention(q, k[..., :5, :], v, ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="head dimension"):
        a = torch.randn(1, 1, 8, 24, device=DEVICE)
        lla_triton.lla_attention(a, a, a, ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="q: expected a floating dtype"):
        lla_triton.lla_attention(q.double(), k.double(), v.double(), ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="one dtype"):
        lla_triton.lla_attention(q, k, v.half(), ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="v: expected"):
        lla_triton.lla_attention(q, k, v[..., :8].contiguous(), ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="ridge_lambda: expected values >= 0"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=-1.0)
    with pytest.raises(LLAInputError, match="ridge_lambda: expected finite"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=float("nan"))
    # a float too large for the kernels' fp32 lambda would be Inf there
    with pytest.raises(LLAInputError, match="ridge_lambda: expected a value finite in torch.float32"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=1e39)
    with pytest.raises(LLAInputError, match="ridge_lambda: expected finite"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=torch.full((1,), 1e39, dtype=torch.float64, device=DEVICE))
    with pytest.raises(LLAInputError, match="ridge_lambda: shape"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=torch.ones(3, device=DEVICE))
    with pytest.raises(LLAInputError, match="qk_scale"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, qk_scale=float("nan"))
    with pytest.raises(LLAInputError, match="qk_scale"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, qk_scale=-2.0)
    with pytest.raises(LLAInputError, match="delta_eps"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, delta_eps=-1.0)
    with pytest.raises(LLAInputError, match="cg_tol"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, cg_tol=float("inf"))
    with pytest.raises(LLAInputError, match="cg_max_iters"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, cg_max_iters=-1)
    with pytest.raises(LLAInputError, match="preconditioner"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, preconditioner="ilu")
    with pytest.raises(LLAInputError, match="precision"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=0.1, precision="fp8")
    bad = q.clone()
    bad[0, 0, 3, 2] = float("inf")
    with pytest.raises(LLAInputError, match="q: expected finite"):
        lla_triton.lla_attention(bad, k, v, ridge_lambda=0.1)
    # the check is deferred to the kernel's own device-to-host read: it still names the
    # tensor and the index, on the autograd path too, and with a tensor lambda
    nan_v = v.clone()
    nan_v[0, 0, 5, 1] = float("nan")
    with pytest.raises(LLAInputError, match=r"v: expected finite values, found 1 non-finite \(first at index \(0, 0, 5, 1\)"):
        lla_triton.lla_attention(q, k, nan_v, ridge_lambda=torch.full((8,), 0.1, device=DEVICE))
    with pytest.raises(LLAInputError, match="k: expected finite"):
        kk = k.clone()
        kk[0, 0, 0, 0] = float("-inf")
        lla_triton.lla_attention(q.clone().requires_grad_(), kk, v, ridge_lambda=0.1)
    with pytest.raises(LLAInputError, match="ridge_lambda: expected values >= 0"):
        lla_triton.lla_attention(q, k, v, ridge_lambda=torch.tensor([0.1, -1.0] * 4, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_error_mixed_devices():
    q, k, v = _ok()
    with pytest.raises(LLAInputError, match="device"):
        lla_triton.lla_attention(q, k.cpu(), v, ridge_lambda=0.1)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = torch.randn(1, 1, 8, 16)
    with pytest.raises(LLAInputError, match="TRITON_INTERPRET"):
        lla_triton.lla_attention(a, a, a, ridge_lambda=0.1)


def test_grad_request_without_backward(monkeypatch):
    """With lla_triton.autograd unavailable (a kernel package shipped forward-only), a
    call that wants gradients says so instead of returning an output autograd cannot
    differentiate, and a call that wants none still runs the forward."""
    monkeypatch.setitem(sys.modules, "lla_triton.autograd", None)  # the import now fails
    q, k, v = _ok()
    want = lla_triton.lla_attention(q, k, v, ridge_lambda=0.1)
    qg = q.clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward"):
        lla_triton.lla_attention(qg, k, v, ridge_lambda=0.1)
    lam = torch.full((1, 1, q.shape[-2]), 0.1, device=DEVICE, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward"):  # a gradient wanted for lambda alone
        lla_triton.lla_attention(q, k, v, ridge_lambda=lam)
    with torch.no_grad():  # no gradient wanted: the forward runs, as without requires_grad
        got = lla_triton.lla_attention(qg, k, v, ridge_lambda=0.1)
    assert not got.requires_grad and torch.equal(got, want)


# ------------------------------------------------------------------------- real sizes (GPU)
GPU_CASES = [
    pytest.param(torch.bfloat16, 0.1, 1000, 64, 0.0, id="bf16-lam0.1-S1000-D64"),
    pytest.param(torch.bfloat16, 0.1, 4096, 64, 0.0, id="bf16-lam0.1-S4096-D64"),
    pytest.param(torch.bfloat16, 0.1, 2048, 128, 0.0, id="bf16-lam0.1-S2048-D128"),
    pytest.param(torch.float32, 1e-3, 1500, 64, 0.0, id="fp32-lam1e-3-S1500-D64"),
    pytest.param(torch.float32, 10.0, 777, 128, 0.0, id="fp32-lam10-S777-D128"),
    pytest.param(torch.bfloat16, 0.1, 2048, 64, 100.0, id="bf16-offset100-S2048-D64"),
    pytest.param(torch.float16, 0.1, 1100, 32, 0.0, id="fp16-lam0.1-S1100-D32"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a CUDA device")
@pytest.mark.parametrize("dtype, lam, S, D, offset", GPU_CASES)
def test_forward_real_sizes(dtype, lam, S, D, offset):
    q, k, v = _inputs(1, 2, S, D, dtype, offset=offset, seed=S)
    o, st = lla_triton.lla_attention(q, k, v, ridge_lambda=lam, return_stats=True)
    # dense fp32 materialises (S, S, D) per head: only up to S = 2048
    _check_against_oracle(q, k, v, lam, o, cg_tol=lla_triton.DEFAULT_CG_TOL, dense=S <= 2048, sens=S <= 2048,
                          residual=st["cg_residual"])
