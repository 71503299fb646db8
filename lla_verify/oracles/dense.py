"""The dense same-precision reference: LLA computed plainly, materialising every z_ij and
Sigma_i, in a chosen compute dtype (the ``torch-fp32`` implementation of the registry, and
the same-precision term of the error budgets).

The reference is built from the pieces below so that the planted bugs of
lla_verify/testing/mutants.py can be this very computation with one step changed: a
mutant that carried a dense core of its own would fail properties the reference passes
(no jitter fallback, no delta guard), and a kill by such a property says nothing about
the planted bug.
"""

from __future__ import annotations

import torch

from lla_contract import check_lambda, check_qkv, check_scale


def prepare(q, k, v, *, ridge_lambda, qk_scale, compute_dtype):
    """Check the inputs; return q, k, v in ``compute_dtype``, the per-query lambda and the scale."""
    check_qkv(q, k, v)
    scale = check_scale(qk_scale, q.shape[-1])
    lam = check_lambda(ridge_lambda, tuple(q.shape[:-1]), q.device, dtype=compute_dtype)
    return q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), lam, scale


def causal_mask(S: int, device) -> torch.Tensor:
    """(S, S) bool, True where key j may be seen by query i (j <= i)."""
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()


def masked_scores(qc, kc, scale, mask):
    """a_ij = scale <q_i, k_j>, -inf where the mask hides key j from query i."""
    a = scale * (qc @ kc.transpose(-1, -2))
    return a.masked_fill(~mask, float("-inf"))


def weights(a):
    """w_ij = exp(a_ij - max_j a_ij): the max keeps exp from overflowing."""
    return torch.exp(a - a.amax(-1, keepdim=True))


def moments(w, qc, kc, ridge):
    """z_ij = k_j - q_i, mu_i = sum_j w_ij z_ij and Sigma_i = sum_j w_ij z_ij z_ij^T + ridge_i I
    (LLA's ridge is lambda_i omega_i)."""
    z = kc[..., None, :, :] - qc[..., :, None, :]  # (..., S, S, D)
    wz = w[..., None] * z
    mu = wz.sum(-2)
    eye = torch.eye(qc.shape[-1], dtype=qc.dtype, device=qc.device)
    sig = wz.transpose(-1, -2) @ z + ridge[..., None, None] * eye
    return z, mu, sig


def guarded_solve(sig, mu):
    """rho_i = Sigma_i^-1 mu_i by Cholesky, and chol_ok_i: whether Sigma_i (jittered if need
    be) factored. A row that does not factor gets a finite stand-in rho_i that
    ``guarded_combine`` discards."""
    cd = sig.dtype
    eye = torch.eye(sig.shape[-1], dtype=cd, device=sig.device)
    # Which rows factor is decided without autograd, and the differentiable factorisation
    # sees only matrices that factor: a failed factor is NaN, and selecting around it
    # afterwards still sends NaN through autograd (0 * NaN is NaN) into every input.
    with torch.no_grad():
        _, info = torch.linalg.cholesky_ex(sig)
        # Sigma_i is SPD in exact arithmetic when lambda_i > 0, but once kappa exceeds
        # 1/u_c its rounded form need not be: a jitter of D u_c tr(Sigma_i)/D is a
        # backward error of the size the rounding already made.
        u = torch.finfo(cd).eps / 2
        needs = (info != 0)[..., None, None]
        jitter = torch.where(needs, (u * torch.diagonal(sig, dim1=-2, dim2=-1).sum(-1))[..., None, None] * eye,
                             torch.zeros_like(sig))
        L0, info2 = torch.linalg.cholesky_ex(sig + jitter)
        chol_ok = (info2 == 0) & torch.isfinite(L0).flatten(-2).all(-1)
    # rows that do not factor even jittered fall back to the softmax average (guarded_combine)
    L, _ = torch.linalg.cholesky_ex(torch.where(chol_ok[..., None, None], sig + jitter, eye))
    rho = torch.cholesky_solve(mu[..., None], L)[..., 0]
    return rho, chol_ok


def guarded_combine(w, omega, z, vc, rho, solved_ok):
    """o_i = sum_j w_ij (1 - <z_ij, rho_i>) v_j / delta_i, in the compute dtype, with the
    kernel's delta guard: rows whose rho_i or delta_i has no correct digit return the
    softmax average (rho_i = 0). ``solved_ok`` marks the rows whose solve succeeded."""
    cd = w.dtype
    rho_ok = solved_ok & torch.isfinite(rho).all(-1)
    rho = torch.where(rho_ok[..., None], rho, torch.zeros_like(rho))
    zr = (z @ rho[..., None])[..., 0]
    g = w * (1.0 - zr)
    den = g.sum(-1)
    # The kernel's delta guard (docs/kernels.md), so that the reference is held to the
    # same function: a den_i below the rounding of the sum it came from (4 u_c of
    # sum_j w_ij (1 + |<z_ij, rho_i>|)) has no correct digit (lambda = 0 early tokens,
    # lambda 1e-8), and a rho_i the jittered Cholesky could not make finite has none
    # either; such rows return the softmax average (rho_i = 0). Without it the
    # reference broke partition of unity at lambda 1e-8 and returned NaN at kappa 1e12.
    u = torch.finfo(cd).eps / 2
    mag = (w * (1.0 + zr.abs())).sum(-1)
    bad = ~rho_ok | ~torch.isfinite(den) | (den.abs() <= 4.0 * u * mag)
    g = torch.where(bad[..., None], w, g)
    den = torch.where(bad, omega, den)
    return (g @ vc) / den[..., None]


def dense_torch_lla(q, k, v, *, ridge_lambda, qk_scale=None, compute_dtype=torch.float32):
    """Dense LLA in ``compute_dtype`` (default fp32): materialises z_ij and Sigma_i.

    The same-precision reference of SPEC 8 (FlashAttention's rule): the plain
    computation, carried out in the kernel's compute precision on the same rounded
    inputs. Direct solve (Cholesky) per query; output in q's dtype. Memory
    Theta(S^2 D), so small S only.
    """
    qc, kc, vc, lam, scale = prepare(q, k, v, ridge_lambda=ridge_lambda, qk_scale=qk_scale,
                                     compute_dtype=compute_dtype)
    w = weights(masked_scores(qc, kc, scale, causal_mask(q.shape[-2], q.device)))
    omega = w.sum(-1)
    z, mu, sig = moments(w, qc, kc, lam * omega)
    rho, chol_ok = guarded_solve(sig, mu)
    return guarded_combine(w, omega, z, vc, rho, chol_ok).to(q.dtype)
