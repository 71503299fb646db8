"""The CG tracking of lla_verify/cg/reference.py (issue 6): reference CG, bound, residual, study.

CPU, float64, seconds. The kernel-facing claims are in properties/test_cg_convergence.py.
"""

import json
import math

import pytest
import torch

from lla_verify.registry.cases import Case
from lla_verify.cg.bound import a_norm_error_at, cg_bound, finite_precision_limit, iteration_bound, jacobi_iteration_bound
from lla_verify.cg.reference import kappas, problem_sigma_mu, reference_cg, residual_rounding, true_residual
from lla_contract import LLAInputError

F64 = torch.float64


def _spd(n_sys, D, kappa, seed=0):
    """n_sys random SPD matrices with eigenvalues log-spaced over [1, kappa] exactly."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n_sys, D, D, generator=g, dtype=F64))
    ev = torch.logspace(0, math.log10(kappa), D, dtype=F64)
    A = Q @ torch.diag_embed(ev.expand(n_sys, D)) @ Q.transpose(-1, -2)
    b = torch.randn(n_sys, D, generator=g, dtype=F64)
    return 0.5 * (A + A.transpose(-1, -2)), b


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e3, 1e6], ids=lambda k: f"kappa={k:g}")
@pytest.mark.parametrize("prec", [None, "jacobi"], ids=["plain", "jacobi"])
def test_reference_cg_solves_to_tolerance_and_matches_solve(kappa, prec):
    A, b = _spd(12, 24, kappa)
    tol = 1e-10
    run = reference_cg(A, b, tol=tol, max_iters=500, preconditioner=prec)
    assert bool(run.converged.all()), f"not converged: iters {run.iters.tolist()}"
    assert float(run.recursive_residual.max()) <= tol
    # the true residual trails the recursive one by float64 rounding of ||A|| ||x||
    assert float(run.residual.max()) <= tol + 50 * 2**-53 * kappa
    x = torch.linalg.solve(A, b[..., None])[..., 0]
    err = ((run.rho - x).norm(dim=-1) / x.norm(dim=-1)).max()
    # forward error <= kappa * relative residual
    assert float(err) <= kappa * (tol + 50 * 2**-53 * kappa), float(err)


def test_reference_cg_history_and_freezing():
    A, b = _spd(5, 16, 1e4)
    run = reference_cg(A, b, tol=1e-8, max_iters=400)
    h = run.history
    assert h.shape[0] == int(run.iters.max()) + 1 and h.shape[1:] == (5,)
    assert torch.allclose(h[0], torch.ones(5, dtype=F64))
    for i in range(5):
        k = int(run.iters[i])
        assert float(h[k, i]) <= 1e-8 < float(h[k - 1, i])
        assert bool((h[k:, i] == h[k, i]).all()), "a converged query must stay frozen"


def test_reference_cg_zero_rhs_and_cap():
    A, b = _spd(3, 8, 100.0)
    b[1] = 0
    run = reference_cg(A, b, tol=1e-12, max_iters=2)
    assert int(run.iters[1]) == 0 and bool(run.converged[1]) and float(run.rho[1].abs().max()) == 0
    assert int(run.iters.max()) <= 2 and not bool(run.converged[0])


def test_reference_cg_singular_breaks_down_cleanly():
    D = 8
    z = torch.randn(3, D, dtype=F64)
    A = (z.T @ z).expand(2, D, D).clone()  # rank 3
    b = torch.randn(2, D, dtype=F64)  # not in the range
    run = reference_cg(A, b, tol=1e-10, max_iters=50)
    assert bool(torch.isfinite(run.rho).all()) and int(run.iters.max()) <= 50


@pytest.mark.parametrize("kappa", [2.0, 100.0, 1e4], ids=lambda k: f"kappa={k:g}")
@pytest.mark.parametrize("prec", [None, "jacobi"], ids=["plain", "jacobi"])
def test_iterations_within_bound_on_known_spectrum(kappa, prec):
    # D large enough that finite termination (<= D steps) does not decide it alone
    A, b = _spd(8, 64, kappa, seed=1)
    tol = 1e-8
    run = reference_cg(A, b, tol=tol, max_iters=10_000, preconditioner=prec)
    kap, kapj = kappas(A)
    bound = iteration_bound(kap, tol) if prec is None else jacobi_iteration_bound(kap, kapj, tol)
    assert bool((run.iters <= bound).all()), f"iters {run.iters.tolist()} vs bound {bound.tolist()}"


@pytest.mark.parametrize("kappa,eps,expected", [
    (1.0, 2.0, 0.0),
    (1.0, 1e-6, math.ceil(0.5 * math.log(2e6))),
    (100.0, 1e-6, math.ceil(5 * math.log(2e6))),
    (1e8, 1e-3, math.ceil(5000 * math.log(2e3))),
], ids=["k1-e2", "k1", "k100", "k1e8"])
def test_bound_formula(kappa, eps, expected):
    assert cg_bound(kappa, eps) == expected
    t = cg_bound(torch.tensor([kappa], dtype=F64), torch.tensor([eps], dtype=F64))
    assert float(t[0]) == expected
    assert iteration_bound(kappa, 1e-6) == cg_bound(kappa, 1e-6 / math.sqrt(kappa))
    assert a_norm_error_at(kappa, 1e-6) == pytest.approx(math.sqrt(kappa) * 1e-6)


def test_bound_rejects_bad_arguments():
    with pytest.raises(LLAInputError):
        cg_bound(0.5, 1e-6)
    with pytest.raises(LLAInputError):
        cg_bound(10.0, 0.0)
    with pytest.raises(LLAInputError):
        reference_cg(torch.eye(2, dtype=F64)[None], torch.ones(1, 2, dtype=F64), tol=1e-6, max_iters=5,
                     preconditioner="ilu")


def test_finite_precision_limit_regions():
    D, tol, cap = 16, 1e-7, 128
    k = torch.tensor([1.0, 100.0, 1e5, 1e7, math.inf], dtype=F64)
    lim = finite_precision_limit(k, tol, D, cap)
    assert float(lim[0]) == iteration_bound(2.0, tol) + 2
    assert float(lim[1]) == min(cap, iteration_bound(200.0, tol) + 2)
    # beyond 1/(2 D u32) (about 5e5 at D = 16) no rate is claimed: only the cap
    assert float(lim[3]) == cap and float(lim[4]) == cap


def test_true_residual_matches_definition():
    A, b = _spd(4, 10, 50.0)
    x = torch.linalg.solve(A, b[..., None])[..., 0]
    assert float(true_residual(A, b, x).max()) < 1e-13
    dx = 1e-3 * torch.randn_like(x)
    want = (A @ dx[..., None])[..., 0].norm(dim=-1) / b.norm(dim=-1)
    torch.testing.assert_close(true_residual(A, b, x + dx), want, rtol=1e-9, atol=1e-15)
    # float32 rho: promoted before the product
    got = true_residual(A, b, (x + dx).float())
    exact = (b - (A @ (x + dx).float().double()[..., None])[..., 0]).norm(dim=-1) / b.norm(dim=-1)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
    assert float(true_residual(A, torch.zeros_like(b), torch.zeros_like(x)).max()) == 0.0


def test_sigma_mu_agrees_with_the_oracle():
    from lla_verify.oracles.float64 import lla_forward_details

    p = Case("spectrum", {"kappa": 1e3, "rotate": 1}, B=1, H=2, S=20, D=8, seed=3).build()
    sig, mu, omega = problem_sigma_mu(p)
    d = lla_forward_details(p.q, p.k, p.v, ridge_lambda=p.ridge_lambda, qk_scale=p.qk_scale)
    torch.testing.assert_close(mu, d.mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(omega, d.omega, rtol=1e-12, atol=1e-12)
    kap, _ = kappas(sig)
    torch.testing.assert_close(kap, d.kappa, rtol=1e-8, atol=0)
    rho = torch.linalg.solve(sig, mu[..., None])[..., 0]
    torch.testing.assert_close(rho, d.rho, rtol=1e-9, atol=1e-12)


def test_residual_rounding_covers_a_float32_residual():
    p = Case("spectrum", {"kappa": 1e4, "rotate": 1}, S=32, D=16, seed=0).build()
    sig, mu, _ = problem_sigma_mu(p)
    rho = reference_cg(sig, mu, tol=1e-6, max_iters=200, dtype=torch.float32).rho
    r32 = (mu.float() - (sig.float() @ rho[..., None])[..., 0]).norm(dim=-1) / mu.float().norm(dim=-1)
    gap = (r32.double() - true_residual(sig, mu, rho)).abs()
    allowed = residual_rounding(p.q, p.k, p.lam_tensor, p.qk_scale, rho)
    assert bool((gap <= allowed).all()), float((gap / allowed).max())


def test_cg_study_quick_writes_its_files(tmp_path):
    from lla_verify.commands.cg import run_study

    doc = run_study(impl_name="none", out=str(tmp_path), kappas=3, shapes=((12, 4),), progress=False,
                    log=lambda *_: None)
    for name in ("cg_iterations.png", "cg_error.png", "cg_points.csv", "cg_points.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert doc["settings"]["kernel_skipped"] == "no implementation asked for (--impl none)"
    assert doc["settings"]["kappa_grid"] == [1.0, 1e4, 1e8]
    back = json.loads((tmp_path / "cg_points.json").read_text())
    assert len(back["rows"]) == 3 * 2 * 12
    header = (tmp_path / "cg_points.csv").read_text().splitlines()[0].split(",")
    assert {"kappa", "bound", "ref64_plain_iters", "ref64_jacobi_iters", "rotate", "kappa_param"} <= set(header)


def test_cg_command_is_registered(tmp_path):
    from lla_verify.cli import main

    assert main(["cg", "--impl", "none", "--kappas", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "cg_points.csv").exists()
