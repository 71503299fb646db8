"""The Chebyshev bound on CG's iterations (SPEC 5) and the slack a float32 kernel is
allowed (docs/cg.md derives it): ``cg_bound``, ``iteration_bound``, ``finite_precision_limit``.

Which eps goes into the bound. SPEC 5 bounds the A-norm error:
||e_k||_A <= 2 ((sqrt(kappa) - 1)/(sqrt(kappa) + 1))^k ||e_0||_A, hence
k(eps) <= ceil(sqrt(kappa)/2 * ln(2/eps)) steps make ||e_k||_A / ||e_0||_A <= eps.
The kernel stops on the relative *residual*. With x_0 = 0, r_k = Sigma e_k and
r_0 = mu, and sqrt(lambda_min) ||e||_A <= ||Sigma e|| <= sqrt(lambda_max) ||e||_A, so

    ||r_k|| / ||mu||  <=  sqrt(kappa) * ||e_k||_A / ||e_0||_A      (1)
    ||e_k||_A / ||e_0||_A  <=  sqrt(kappa) * ||r_k|| / ||mu||      (2)

By (1), reaching a relative residual tol is guaranteed once the A-norm error ratio
is at most tol / sqrt(kappa): the iteration bound we check is k(eps) with
**eps = tol / sqrt(kappa)** (``iteration_bound``). By (2), a kernel that stops at
relative residual tol has an A-norm error of at most sqrt(kappa) * tol
(``a_norm_error_at``).
"""

from __future__ import annotations

import math

import torch

from lla_contract import LLAInputError


_F64 = torch.float64
U32 = 2.0**-24
# Slack for the float32 kernel's iteration count (docs/cg.md, "The slack"):
# Greenbaum: finite-precision CG behaves like exact CG on a matrix whose eigenvalues
# lie within GREENBAUM_C * D * u * lambda_max of Sigma_i's. While that width is at
# most half of lambda_min, the effective condition number is at most
# KAPPA_FP_FACTOR * kappa (1 + small), so the Chebyshev bound holds with kappa
# replaced by 2 kappa. EXTRA_ITERS covers the stopping test itself: the residual
# norm compared against tol * ||mu|| is computed in float32 and can sit on either
# side of the threshold for one step, and kernels differ by one in whether the
# check counts before or after the update.
GREENBAUM_C = 1.0
KAPPA_FP_FACTOR = 2.0
EXTRA_ITERS = 2
def cg_bound(kappa, eps):
    """SPEC 5: steps after which the A-norm error ratio is at most eps.

    k(eps) = ceil(sqrt(kappa)/2 * ln(2/eps)); elementwise over tensors, floats in,
    float out. kappa >= 1 and 0 < eps < 2 (eps >= 2 needs no step: returns 0);
    kappa = inf gives inf.
    """
    if isinstance(kappa, torch.Tensor) or isinstance(eps, torch.Tensor):
        kap = torch.as_tensor(kappa, dtype=_F64)
        e = torch.as_tensor(eps, dtype=_F64, device=kap.device)
        if bool((kap < 1).any()) or bool((e <= 0).any()):
            raise LLAInputError("cg_bound: expected kappa >= 1 and eps > 0")
        return torch.ceil(torch.sqrt(kap) / 2 * torch.log(2.0 / e)).clamp_min(0.0)
    kappa, eps = float(kappa), float(eps)
    if not kappa >= 1 or not eps > 0:
        raise LLAInputError(f"cg_bound: expected kappa >= 1 and eps > 0, got kappa={kappa}, eps={eps}")
    if math.isinf(kappa):
        return math.inf
    return float(max(0, math.ceil(math.sqrt(kappa) / 2 * math.log(2.0 / eps))))


def residual_tol_to_eps(kappa, tol):
    """The A-norm error ratio that guarantees relative residual <= tol: tol / sqrt(kappa) (eq. 1)."""
    if isinstance(kappa, torch.Tensor):
        return tol / torch.sqrt(kappa.to(_F64))
    return float(tol) / math.sqrt(float(kappa))


def a_norm_error_at(kappa, relres):
    """Upper bound on ||e||_A / ||e_0||_A when the relative residual is relres (eq. 2)."""
    if isinstance(kappa, torch.Tensor):
        return torch.sqrt(kappa.to(_F64)) * relres
    return math.sqrt(float(kappa)) * float(relres)


def iteration_bound(kappa, tol):
    """Steps after which exact CG has relative residual <= tol: k(eps = tol / sqrt(kappa))."""
    return cg_bound(kappa, residual_tol_to_eps(kappa, tol))


def jacobi_iteration_bound(kappa, kappa_jacobi, tol):
    """The same for Jacobi-preconditioned CG: rate from kappa(D^-1/2 Sigma D^-1/2), eps from kappa(Sigma).

    Preconditioned CG contracts the Sigma-norm error at the rate of the scaled matrix,
    while eq. (1) linking it to the unpreconditioned residual (the stopping test) is
    about Sigma itself: k = ceil(sqrt(kappa_jacobi)/2 * ln(2 sqrt(kappa) / tol)).
    """
    return cg_bound(kappa_jacobi, residual_tol_to_eps(kappa, tol))


def bound_applies(kappa, D: int, u: float = U32):
    """Where the finite-precision argument holds: GREENBAUM_C * D * u * kappa <= 1/2."""
    return GREENBAUM_C * D * u * kappa <= 0.5


def finite_precision_limit(kappa, tol, D: int, max_iters: int, u: float = U32, kappa_rate=None):
    """The most iterations we allow a kernel computing in unit roundoff u.

    min(max_iters, k + EXTRA_ITERS), k the bound at tol with the rate's condition
    number multiplied by KAPPA_FP_FACTOR (kappa_rate: the Jacobi-scaled kappa for
    preconditioned CG, default kappa), where ``bound_applies``; just max_iters beyond
    (no rate is claimed once the rounding width reaches lambda_min). Tensors in,
    float64 tensor out.
    """
    kap = torch.as_tensor(kappa, dtype=_F64)
    rate = kap if kappa_rate is None else torch.as_tensor(kappa_rate, dtype=_F64)
    fin = torch.isfinite(kap) & torch.isfinite(rate)
    one = torch.ones_like(kap)
    # the factor goes on both: the rate and the residual-to-error link (eq. 1) alike
    # see the perturbed spectrum
    lim = jacobi_iteration_bound(KAPPA_FP_FACTOR * torch.where(fin, kap, one),
                                 KAPPA_FP_FACTOR * torch.where(fin, rate, one).clamp_min(1.0), tol) + EXTRA_ITERS
    lim = torch.where(bound_applies(kap, D, u) & fin, lim, torch.full_like(lim, math.inf))
    return lim.clamp_max(float(max_iters))
